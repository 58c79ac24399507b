"""Validation of `@remote` / `.options()` keywords for tasks and actors, with Ray's rules.

Bad options fail where they are written (at decoration or `.options()` time) with Ray's error
types, instead of surfacing later inside the cluster.
"""

from __future__ import annotations

import numbers
from typing import Any

_COMMON = {
    "num_cpus",
    "num_gpus",
    "memory",
    "resources",
    "accelerator_type",
    "runtime_env",
    "scheduling_strategy",
    "name",
    "label_selector",
    "_metadata",
    "enable_task_events",
    "object_store_memory",
}
TASK_OPTIONS = _COMMON | {
    "num_returns",
    "max_retries",
    "retry_exceptions",
    "max_calls",
    "_generator_backpressure_num_objects",
}
ACTOR_OPTIONS = _COMMON | {
    "namespace",
    "lifetime",
    "get_if_exists",
    "max_restarts",
    "max_task_retries",
    "max_concurrency",
    "concurrency_groups",
    "max_pending_calls",
    "allow_out_of_order_execution",
}
METHOD_OPTIONS = {"num_returns", "concurrency_group", "max_task_retries", "retry_exceptions"}

SUPPORTED_RUNTIME_ENV = {"env_vars", "config"}


def validate(options: dict[str, Any], kind: str) -> dict[str, Any]:
    """Check option names and values; kind is "task", "actor" or "method"."""
    valid = {"task": TASK_OPTIONS, "actor": ACTOR_OPTIONS, "method": METHOD_OPTIONS}[kind]
    for key in options:
        if key not in valid:
            what = {"task": "remote functions", "actor": "actors", "method": "actor methods"}
            raise ValueError(
                f"Invalid option keyword {key} for {what[kind]}. Valid ones are {sorted(valid)}."
            )
    for key in ("num_cpus", "num_gpus", "memory", "object_store_memory"):
        value = options.get(key)
        if value is not None and (
            not isinstance(value, numbers.Number) or isinstance(value, bool) or value < 0
        ):
            raise ValueError(f"The keyword '{key}' only accepts None or a non-negative number.")
    resources = options.get("resources")
    if resources is not None:
        if not isinstance(resources, dict):
            raise TypeError("The 'resources' keyword must be a dict of resource name to amount.")
        for name, amount in resources.items():
            if name in ("CPU", "GPU"):
                raise ValueError(
                    "Use the 'num_cpus' and 'num_gpus' keyword instead of 'CPU' and 'GPU' "
                    "in 'resources' keyword"
                )
            if not isinstance(amount, numbers.Number) or isinstance(amount, bool) or amount < 0:
                raise ValueError(f"Resource quantities must be non-negative numbers: {name}")
    if "num_returns" in options:
        value = options["num_returns"]
        if value not in ("dynamic", "streaming") and (
            not isinstance(value, int) or isinstance(value, bool) or value < 0
        ):
            raise ValueError("The keyword 'num_returns' only accepts 0 or a positive integer.")
        if value in ("dynamic", "streaming"):
            raise ValueError(f"num_returns={value!r} (generators) is not supported by redray.")
    for key in ("max_retries", "max_restarts", "max_task_retries"):
        value = options.get(key)
        if value is not None and (not isinstance(value, int) or value < -1):
            raise ValueError(f"The keyword '{key}' only accepts -1, 0 or a positive integer.")
    value = options.get("max_concurrency")
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError("max_concurrency must be an integer >= 1.")
    retry = options.get("retry_exceptions")
    if retry is not None and not isinstance(retry, bool):
        if not isinstance(retry, (list, tuple)) or not all(
            isinstance(t, type) and issubclass(t, BaseException) for t in retry
        ):
            raise TypeError("retry_exceptions must be either a boolean or a list of exceptions")
    lifetime = options.get("lifetime")
    if lifetime not in (None, "detached", "non_detached"):
        raise ValueError("actor `lifetime` argument must be one of 'detached', 'non_detached'.")
    name = options.get("name")
    if name is not None and (not isinstance(name, str) or (kind == "actor" and not name)):
        raise TypeError(f"name must be None or a non-empty string, got {name!r}.")
    namespace = options.get("namespace")
    if namespace is not None and (not isinstance(namespace, str) or not namespace):
        raise TypeError(f"namespace must be None or a non-empty string, got {namespace!r}.")
    validate_runtime_env(options.get("runtime_env"))
    strategy = options.get("scheduling_strategy")
    if strategy is not None:
        from redray.util.scheduling_strategies import check_strategy

        check_strategy(strategy)
    return options


def validate_runtime_env(runtime_env: Any) -> None:
    if runtime_env is None:
        return
    if not isinstance(runtime_env, dict):
        raise TypeError("runtime_env must be a dict.")
    unsupported = set(runtime_env) - SUPPORTED_RUNTIME_ENV
    if unsupported:
        raise ValueError(
            f"runtime_env fields {sorted(unsupported)} are not supported by redray; "
            f"supported: {sorted(SUPPORTED_RUNTIME_ENV)}."
        )
    env_vars = runtime_env.get("env_vars")
    if env_vars is not None:
        if not isinstance(env_vars, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items()
        ):
            raise TypeError("runtime_env['env_vars'] must be a dict of str to str.")


def task_resources(options: dict[str, Any], default_cpus: float = 1.0) -> dict[str, float]:
    """The resource request of a task or actor from its options."""
    num_cpus = options.get("num_cpus")
    resources = {"CPU": default_cpus if num_cpus is None else float(num_cpus)}
    if options.get("num_gpus"):
        resources["GPU"] = float(options["num_gpus"])
    if options.get("memory"):
        resources["memory"] = float(options["memory"])
    for name, amount in (options.get("resources") or {}).items():
        resources[name] = float(amount)
    return {k: v for k, v in resources.items() if v}


def placement(resources: dict[str, float], strategy: Any) -> tuple[dict[str, float], Any]:
    """Resources and wire strategy of a task or actor, drawing from a placement group's
    bundle when the strategy names one."""
    from redray.util.scheduling_strategies import PlacementGroupSchedulingStrategy, wire

    if isinstance(strategy, PlacementGroupSchedulingStrategy) and strategy.placement_group:
        from redray.util.placement_group import bundle_resources

        pg = strategy.placement_group
        index = strategy.placement_group_bundle_index
        if index >= pg.bundle_count or index < -1:
            raise ValueError(
                f"placement_group_bundle_index {index} is invalid for a placement group "
                f"with {pg.bundle_count} bundles."
            )
        return bundle_resources(resources, pg.id.hex(), index), wire(strategy)
    return resources, wire(strategy)
