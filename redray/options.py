"""Validation of `@remote` / `.options()` keywords for tasks and actors, with Ray's rules.

Bad options fail where they are written (at decoration or `.options()` time) with Ray's error
types, instead of surfacing later inside the cluster.
"""

from __future__ import annotations

import numbers
from typing import Any

from redray.resources import bundle_resources
from redray.runtime_env import spec as env_spec
from redray.util.scheduling_strategies import PlacementGroupSchedulingStrategy, check_strategy, wire

_NONE = type(None)
RESOURCE_UNIT = 0.0001  # the smallest fraction of a resource a request may name (as Ray)


class _Option:
    """The type (TypeError when wrong) and value rule (ValueError) of one option, as Ray's."""

    __slots__ = ("types", "rule")

    def __init__(self, types: type | tuple[type, ...] | None = None, rule: Any = None):
        self.types = types
        self.rule = rule  # value -> error message, or None when the value is fine

    def validate(self, keyword: str, value: Any) -> None:
        if self.types is not None and not isinstance(value, self.types):
            raise TypeError(
                f"The type of keyword '{keyword}' must be {self.types}, "
                f"but received type {type(value)}"
            )
        if self.rule is not None:
            message = self.rule(value)
            if message:
                raise ValueError(message)


def _counting(name: str, infinite: bool = True) -> _Option:
    """A count: None, 0 or more (and -1 for "no limit" when infinite)."""
    if infinite:
        return _Option(
            (int, _NONE),
            lambda x: (
                None
                if x is None or x >= -1
                else f"The keyword '{name}' only accepts None, 0, -1 or a positive integer, "
                "where -1 represents infinity."
            ),
        )
    return _Option(
        (int, _NONE),
        lambda x: (
            None
            if x is None or x >= 0
            else f"The keyword '{name}' only accepts None, 0 or a positive integer."
        ),
    )


def _quantity_error(name: Any, quantity: Any) -> str | None:
    if not isinstance(quantity, numbers.Real):
        raise TypeError(f"The quantity of resource {name} must be a number, got {type(quantity)}")
    if quantity < 0:
        return f"The quantity of resource {name} cannot be negative"
    if isinstance(quantity, float) and quantity != 0.0 and int(quantity / RESOURCE_UNIT) == 0:
        return (
            f"The precision of the fractional quantity of resource {name} cannot go beyond "
            f"{RESOURCE_UNIT}"
        )
    return None


def _resource(name: str) -> _Option:
    return _Option((float, int, _NONE), lambda x: None if x is None else _quantity_error(name, x))


def _resources_error(resources: dict | None) -> str | None:
    if resources is None:
        return None
    if "CPU" in resources or "GPU" in resources:
        return (
            "Use the 'num_cpus' and 'num_gpus' keyword instead of 'CPU' and 'GPU' "
            "in 'resources' keyword"
        )
    for name, quantity in resources.items():
        if not isinstance(name, str):
            raise TypeError(f"Resource names must be strings, got {name!r}")
        error = _quantity_error(name, quantity)
        if error:
            return error
    return None


def _num_returns_error(value: Any) -> str | None:
    if value is None or value in ("dynamic", "streaming"):
        return None
    if isinstance(value, str):
        raise TypeError(
            f"The keyword 'num_returns' only accepts None, a non-negative integer, "
            f"'streaming' or 'dynamic', got {value!r}"
        )
    if value < 0:
        return (
            "The keyword 'num_returns' only accepts None, a non-negative integer, "
            "'streaming' (for generators), or 'dynamic'."
        )
    return None


def _retry_exceptions_error(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if all(isinstance(t, type) and issubclass(t, Exception) for t in value):
        return None
    return "retry_exceptions must be either a boolean or a list of exceptions"


_COMMON = {
    "num_cpus": _resource("num_cpus"),
    "num_gpus": _resource("num_gpus"),
    "memory": _resource("memory"),
    "resources": _Option((dict, _NONE), _resources_error),
    "accelerator_type": _Option((str, _NONE)),
    "runtime_env": _Option((dict, _NONE)),
    "scheduling_strategy": _Option(None),  # checked by check_strategy below
    "name": _Option((str, _NONE)),
    "label_selector": _Option((dict, _NONE)),
    "_metadata": _Option((dict, _NONE)),
    "enable_task_events": _Option(bool),
    "object_store_memory": _counting("object_store_memory", infinite=False),
}
_TASK = {
    **_COMMON,
    "num_returns": _Option((int, str, _NONE), _num_returns_error),
    "max_retries": _counting("max_retries"),
    "retry_exceptions": _Option((bool, list, tuple), _retry_exceptions_error),
    "max_calls": _counting("max_calls", infinite=False),
    "object_store_memory": _Option(
        (int, _NONE),
        lambda x: (
            None if x is None else "Setting 'object_store_memory' is not implemented for tasks"
        ),
    ),
    "_generator_backpressure_num_objects": _Option(
        (int, _NONE),
        lambda x: "_generator_backpressure_num_objects=0 is not allowed." if x == 0 else None,
    ),
}
_ACTOR = {
    **_COMMON,
    "namespace": _Option(
        (str, _NONE),
        lambda x: (
            '"" is not a valid namespace. Pass None to not specify a namespace.'
            if x == ""
            else None
        ),
    ),
    "lifetime": _Option(
        (str, _NONE),
        lambda x: (
            None
            if x in (None, "detached", "non_detached")
            else "actor `lifetime` argument must be one of 'detached', 'non_detached' and 'None'."
        ),
    ),
    "get_if_exists": _Option(bool),
    "max_restarts": _counting("max_restarts"),
    "max_task_retries": _counting("max_task_retries"),
    "max_concurrency": _counting("max_concurrency", infinite=False),
    "concurrency_groups": _Option((list, dict, _NONE)),
    "max_pending_calls": _counting("max_pending_calls"),
    "allow_out_of_order_execution": _Option((bool, _NONE)),
}
_METHOD = {
    "num_returns": _TASK["num_returns"],
    "concurrency_group": _Option((str, _NONE)),
    "max_task_retries": _ACTOR["max_task_retries"],
    "retry_exceptions": _TASK["retry_exceptions"],
    "enable_task_events": _Option((bool, _NONE)),
    "_generator_backpressure_num_objects": _TASK["_generator_backpressure_num_objects"],
}
# Options whose None stands for their default (so `.options(x=None)` undoes a decorator's x).
_DEFAULT_FOR_NONE = {
    "task": {"max_retries": 3, "max_calls": 0},
    "actor": {"max_restarts": 0, "max_task_retries": 0, "max_pending_calls": -1},
    "method": {},
}
TASK_OPTIONS = set(_TASK)
ACTOR_OPTIONS = set(_ACTOR)
METHOD_OPTIONS = set(_METHOD)

SUPPORTED_RUNTIME_ENV = set(env_spec.FIELDS)


def validate(options: dict[str, Any], kind: str, in_options: bool = False) -> dict[str, Any]:
    """Check option names, types and values as Ray does (TypeError for a wrong type,
    ValueError for a wrong value); kind is "task", "actor" or "method"; in_options: they
    were given to `.options()` rather than to `@remote`."""
    table = {"task": _TASK, "actor": _ACTOR, "method": _METHOD}[kind]
    for key, value in options.items():
        option = table.get(key)
        if option is None:
            what = {"task": "remote functions", "actor": "actors", "method": "actor methods"}
            raise ValueError(
                f"Invalid option keyword {key} for {what[kind]}. Valid ones are {sorted(table)}."
            )
        option.validate(key, value)
    if in_options and kind == "task" and "max_calls" in options:
        raise ValueError("Setting 'max_calls' is not supported in '.options()'.")
    if in_options and kind == "actor" and "concurrency_groups" in options:
        raise ValueError("Setting 'concurrency_groups' is not supported in '.options()'.")
    if kind == "actor":
        if options.get("name") == "":
            raise ValueError("Actor name cannot be an empty string.")
        if options.get("get_if_exists") and not options.get("name"):
            raise ValueError("The actor name must be specified to use `get_if_exists`.")
    validate_runtime_env(options.get("runtime_env"))
    strategy = options.get("scheduling_strategy")
    if strategy is not None:
        check_strategy(strategy)
    for key, default in _DEFAULT_FOR_NONE[kind].items():
        if key in options and options[key] is None:
            options[key] = default
    return options


def returns(num_returns: Any, is_generator: bool) -> tuple[int, str | None]:
    """(return count, generator kind) of a call: num_returns None means its default, which
    is "streaming" for generator functions (as Ray's). ValueError for "streaming" or
    "dynamic" on a function that is not a generator."""
    if num_returns is None:
        num_returns = "streaming" if is_generator else 1
    if num_returns in ("streaming", "dynamic"):
        if not is_generator:
            raise ValueError(
                f"num_returns='{num_returns}' can only be used with generator functions "
                "(functions that use 'yield'). The decorated function is not a generator "
                "function."
            )
        return 1, num_returns
    return num_returns, "fixed" if is_generator else None


def validate_runtime_env(runtime_env: Any) -> None:
    """TypeError/ValueError for a runtime_env Ray would refuse or redray cannot honour."""
    env_spec.validate(runtime_env)


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
    if isinstance(strategy, PlacementGroupSchedulingStrategy) and strategy.placement_group:
        pg = strategy.placement_group
        index = strategy.placement_group_bundle_index
        if index >= pg.bundle_count or index < -1:
            raise ValueError(
                f"placement_group_bundle_index {index} is invalid for a placement group "
                f"with {pg.bundle_count} bundles."
            )
        return bundle_resources(resources, pg.id.hex(), index), wire(strategy)
    return resources, wire(strategy)
