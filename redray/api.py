"""The public API: init, shutdown, remote, get, put, wait, cancel and cluster queries.

The parts behind it (the core worker, the actor runtime, redis, cloudpickle, node launching)
are imported on first use, not at module level: `import redray` stays cheap for scripts
and CLI commands that never start a cluster. None of those imports is needed to break a cycle.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from redray import exceptions
from redray.core import context
from redray.core.generators import ObjectRefGenerator
from redray.core.object_ref import ObjectRef
from redray.dashboard import launch as dashboard_launch

log = logging.getLogger("redray")

_init_lock = threading.RLock()
LOCAL_RESOURCES_TIMEOUT = 5.0
_private_node: Any = None  # the node init() started for a private cluster
_private_dashboard: Any = None  # and its dashboard, when asked for


class RayContext(dict):
    """What `init()` returns: connection facts; usable as a context manager."""

    def __init__(self, info: dict[str, Any]):
        super().__init__(info)
        self.address_info = info
        self.dashboard_url = info.get("webui_url")

    def __enter__(self) -> RayContext:
        return self

    def __exit__(self, *exc: object) -> None:
        shutdown()

    def disconnect(self) -> None:
        shutdown()


def is_initialized() -> bool:
    """True when this process is connected to a cluster."""
    return context.current is not None


def init(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    resources: dict[str, float] | None = None,
    labels: dict[str, str] | None = None,
    object_store_memory: int | None = None,
    local_mode: bool = False,
    ignore_reinit_error: bool = False,
    include_dashboard: bool | None = None,
    dashboard_host: str = "127.0.0.1",
    dashboard_port: int | None = None,
    job_config: Any = None,
    configure_logging: bool = True,
    logging_level: int = logging.INFO,
    logging_format: str | None = None,
    log_to_driver: bool = True,
    namespace: str | None = None,
    runtime_env: dict[str, Any] | None = None,
    _node_ip_address: str | None = None,
    _temp_dir: str | None = None,
    _system_config: dict[str, Any] | None = None,
    _metrics_export_port: int | None = None,
) -> RayContext:
    """Connect to a cluster, or start a private one on this machine.

    With no address (and no REDRAY_ADDRESS), a private cluster is started (Redis on a free
    port, one raylet with a worker pool) and torn down by `shutdown()` or at exit. "auto"
    connects to the cluster `redray start` runs on this machine; "redis://..." connects to
    the cluster whose GCS lives there. `_temp_dir` is where a private cluster's session
    directory (logs, spilled objects) goes; `_node_ip_address` must be an address of this
    machine, not 0.0.0.0.

    `include_dashboard=True` starts a private cluster's dashboard (off by default: see
    docs/observability.md) on dashboard_host:dashboard_port (8265 or the next free port when
    not given); the context's `dashboard_url` says where it is, for a private cluster or one
    whose head runs a dashboard. `_metrics_export_port` serves the private node's Prometheus
    metrics there.
    """
    global _private_node, _private_dashboard
    with _init_lock:
        if context.current is not None:
            if ignore_reinit_error:
                log.info("Calling redray.init() again after it has already been called.")
                return RayContext(_context_info())
            raise RuntimeError(
                "Maybe you called redray.init twice by accident? This error can be suppressed "
                "by passing in 'ignore_reinit_error=True' or by calling 'redray.shutdown()' "
                "prior to 'redray.init()'."
            )
        if local_mode:
            raise ValueError("local_mode is not supported by redray (it is deprecated in Ray).")
        from redray import options

        if job_config is not None:
            _check_job_config(job_config)
            # As in Ray, what init() is given directly wins over the job config.
            if runtime_env is None and job_config.runtime_env:
                runtime_env = job_config.runtime_env
            if namespace is None:
                namespace = job_config.ray_namespace
        options.validate_runtime_env(runtime_env)
        if _node_ip_address is not None:
            from redray.node import launch as node

            node.check_node_ip(_node_ip_address)
        address = address or os.environ.get("REDRAY_ADDRESS") or os.environ.get("RAY_ADDRESS")
        if address is None or address == "local":
            connection = _start_private_cluster(
                num_cpus, num_gpus, resources, object_store_memory, _node_ip_address, _temp_dir
            )
        else:
            if any(v is not None for v in (num_cpus, num_gpus, resources, object_store_memory)):
                raise ValueError(
                    "When connecting to an existing cluster, num_cpus, num_gpus, resources "
                    "and object_store_memory must not be provided."
                )
            connection = _connect_existing(address, _node_ip_address)
        try:
            if _private_node is not None and (
                include_dashboard or _metrics_export_port is not None
            ):
                _private_dashboard = _start_private_dashboard(
                    connection,
                    include_dashboard,
                    dashboard_host,
                    dashboard_port,
                    _metrics_export_port,
                )
            _start_driver(connection, namespace, log_to_driver, runtime_env, job_config)
            if _private_dashboard and include_dashboard:
                dashboard_launch.record_url(context.current.gcs, _private_dashboard[0].url)
        except BaseException:
            _stop_private_dashboard()
            if _private_node is not None:
                from redray.node import launch as node

                _private_node.stop()
                node.remove_session_dir(_private_node.session_dir)
                _private_node = None
            raise
        return RayContext(_context_info())


def _start_private_dashboard(
    connection: dict[str, Any],
    include_dashboard: bool | None,
    host: str,
    port: int | None,
    metrics_export_port: int | None,
) -> list[Any]:
    """The dashboard and the metrics exporter of a private cluster (they die with us)."""
    started = []
    logs = os.path.join(_private_node.session_dir, "logs")
    try:
        if include_dashboard:
            dashboard = dashboard_launch.start(
                gcs_url=connection["gcs_url"],
                cluster=connection["cluster"],
                host=host or "127.0.0.1",
                port=port,
                log_dir=logs,
            )
            started.append(dashboard)
        if metrics_export_port is not None:
            started.append(
                dashboard_launch.start(
                    gcs_url=connection["gcs_url"],
                    cluster=connection["cluster"],
                    host=connection["node_ip_address"],
                    port=metrics_export_port,
                    log_dir=logs,
                    node_id=_private_node.info["node_id"],
                )
            )
    except BaseException:
        for process in started:
            process.stop()
        raise
    return started


def _stop_private_dashboard() -> None:
    global _private_dashboard
    processes, _private_dashboard = _private_dashboard, None
    for process in processes or ():
        process.stop()


def _start_private_cluster(
    num_cpus, num_gpus, resources, object_store_memory, node_ip, temp_dir=None
):
    global _private_node
    from redray.node import launch as node

    if resources is not None:
        if not isinstance(resources, dict):
            raise TypeError("resources must be a dict of resource name to amount")
        for name in ("CPU", "GPU"):
            if name in resources:
                raise ValueError(
                    "Use the 'num_cpus' and 'num_gpus' keywords instead of 'CPU' and 'GPU' "
                    "in 'resources'."
                )
    node_ip = node_ip or "127.0.0.1"
    token = secrets.token_bytes(32)
    started = node.start_node(
        head=True,
        token=token,
        cluster="default",
        resources=node.default_resources(num_cpus, num_gpus, resources, node_ip, head=True),
        object_store_memory=int(object_store_memory or node.default_object_store_memory()),
        node_ip_address=node_ip,
        redis_password=secrets.token_hex(16),
        session_dir=node.new_session_dir(temp_dir),
        private=True,
        while_starting=_import_runtime,  # overlaps our imports with the node's start-up
    )
    _private_node = started
    info = started.info
    return {
        "gcs_url": info["gcs_url"],
        "cluster": "default",
        "token": token,
        "raylet_address": tuple(info["raylet_address"]),
        "node_ip_address": info["node_ip_address"],
    }


def _import_runtime() -> None:
    import redray.worker  # noqa: F401 - redis, cloudpickle and the core worker


def _connect_existing(address: str, node_ip: str | None = None) -> dict[str, Any]:
    from redray.gcs import DEFAULT_CLUSTER, URL_SCHEMES, Gcs
    from redray.node import launch as node

    cluster = os.environ.get("REDRAY_CLUSTER") or DEFAULT_CLUSTER
    if address == "auto":
        current = node.read_current_cluster()
        if current is None:
            raise ConnectionError(
                "Could not find any running redray instance. Please specify the one to "
                "connect to by setting `address` (redis://HOST:PORT), or start one with "
                "`redray start --head`."
            )
        address, cluster = current["gcs_url"], current.get("cluster", DEFAULT_CLUSTER)
    if not address.startswith(URL_SCHEMES):
        address = "redis://" + address
    import redis

    gcs = Gcs(address, cluster)
    try:
        token = gcs.cluster_token()
        alive = [n for n in gcs.nodes() if n["alive"]]
    except redis.exceptions.AuthenticationError as exc:
        raise ConnectionError(f"Redis at {address} refused our credentials: {exc}") from exc
    except redis.exceptions.ConnectionError as exc:
        raise ConnectionError(f"Could not reach the cluster's Redis at {address}: {exc}") from exc
    finally:
        gcs.close()
    if token is None:
        raise ConnectionError(f"No redray cluster {cluster!r} is registered in Redis at {address}")
    if not alive:
        raise ConnectionError("The cluster has no live node to connect to.")
    local = _pick_local_node(alive, node_ip)
    return {
        "gcs_url": address,
        "cluster": cluster,
        "token": token,
        "raylet_address": tuple(local["raylet_address"]),
        "node_ip_address": local["node_ip_address"],
    }


def _pick_local_node(nodes: list[dict[str, Any]], node_ip: str | None) -> dict[str, Any]:
    """The node this driver attaches to: the one at node_ip, else the head on this host."""
    import socket

    if node_ip is not None:
        for info in nodes:
            if info.get("node_ip_address") == node_ip:
                return info
        raise ConnectionError(f"No live node of the cluster has the address {node_ip}.")
    node_id = os.environ.get("REDRAY_NODE_ID")  # a submitted job's driver: its own node
    for info in nodes:
        if node_id and info.get("node_id") == node_id:
            return info
    hostname = socket.gethostname()
    for info in nodes:
        if info.get("hostname") == hostname and info.get("is_head"):
            return info
    for info in nodes:
        if info.get("hostname") == hostname:
            return info
    return nodes[0]


def _driver_paths() -> tuple[str, ...]:
    """Directories tasks must be able to import from: the script's and the cwd (as Ray)."""
    paths = []
    script = sys.argv[0] if sys.argv else ""
    if script and os.path.isfile(script):
        paths.append(os.path.dirname(os.path.abspath(script)))
    paths.append(os.getcwd())
    return tuple(dict.fromkeys(paths))


def _check_job_config(job_config: Any) -> None:
    from redray.job_config import JobConfig

    if not isinstance(job_config, JobConfig):
        raise TypeError(f"job_config must be a redray.job_config.JobConfig, got {type(job_config)}")
    refused = job_config.unsupported()
    if refused:
        raise ValueError(f"JobConfig settings not supported by redray: {'; '.join(refused)}.")


def _start_driver(connection, namespace, log_to_driver, runtime_env, job_config=None) -> None:
    from redray.core.jobs import JobInfo
    from redray.gcs import Gcs
    from redray.runtime_env import packaging
    from redray.runtime_env import spec as env_spec
    from redray.worker import CoreWorker

    gcs = Gcs(connection["gcs_url"], connection["cluster"])
    job_number = gcs.next_job_id()
    gcs.close()
    job_id = job_number.to_bytes(4, "little").hex()
    worker = CoreWorker(
        mode="driver",
        token=connection["token"],
        raylet_address=connection["raylet_address"],
        gcs_url=connection["gcs_url"],
        cluster=connection["cluster"],
        worker_id=os.urandom(16),
        job_id=job_id,
        namespace=namespace or f"anonymous-{job_id}",
        listen_host=connection["node_ip_address"],
        log_to_driver=log_to_driver,
    )
    try:
        # A submitted job's runtime env is its driver's default (what init() got wins).
        runtime_env = env_spec.merge(packaging.submitted_job_env(), runtime_env)
        runtime_env = packaging.resolve_once(runtime_env, worker.gcs)
        worker.jobs.jobs[job_id] = JobInfo(
            job_id,
            worker.address,
            worker.namespace,
            log_to_driver,
            _driver_paths() + (job_config.import_paths() if job_config is not None else ()),
            runtime_env,
        )
        worker.gcs.add_job(
            job_id,
            {
                "driver_pid": os.getpid(),
                "driver_address": list(worker.address[:2]),
                "metadata": dict(job_config.metadata) if job_config is not None else {},
            },
        )
    except BaseException:
        worker.shutdown()  # its threads and sockets must not outlive a failed init
        raise
    context.current = worker
    _defer_sigint(worker)


def _defer_sigint(worker) -> None:
    """Ctrl-C still raises KeyboardInterrupt in the driver, but never inside the runtime's
    message handling when the main thread runs it (see Reactor.block); a handler the user
    installed is left alone (the main thread then never runs the reactor loop)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return
    reactor = worker.reactor

    def on_sigint(signum: int, frame: Any) -> None:
        reactor.keyboard_interrupt()

    on_sigint.defers_in_reactor = True  # type: ignore[attr-defined]
    signal.signal(signal.SIGINT, on_sigint)


def _restore_sigint() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    if getattr(signal.getsignal(signal.SIGINT), "defers_in_reactor", False):
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _context_info() -> dict[str, Any]:
    worker = context.current
    try:
        dashboard_url = dashboard_launch.recorded_url(worker.gcs)
    except Exception:  # (the URL is a courtesy: never a reason for init to fail)
        dashboard_url = None
    return {
        "webui_url": dashboard_url,
        "node_ip_address": worker.node.get("node_ip_address"),
        "gcs_address": worker.gcs.url,
        "address": worker.gcs.url,
        "node_id": worker.node_id,
        "session_dir": worker.node.get("session_dir"),
        "job_id": worker.job_id,
    }


def shutdown(_exiting_interpreter: bool = False) -> None:
    """Disconnect; if init() started a private cluster, stop it and everything in it."""
    global _private_node
    with _init_lock:
        worker = context.current
        if worker is not None:
            context.current = None
            worker.gcs.ride_out = 0.0  # leaving: nothing waits for an absent Redis now
            try:
                worker.gcs.finish_job(worker.job_id)
            except Exception:
                pass
            worker.shutdown()
            _restore_sigint()
        _stop_private_dashboard()
        if _private_node is not None:
            started, _private_node = _private_node, None
            started.stop()
            from redray.node import launch as node

            node.remove_session_dir(started.session_dir)


atexit.register(shutdown, True)
context.start_cluster = init  # the first remote call starts a cluster, as Ray's does


def remote(*args: Any, **options: Any) -> Any:
    """Make a function a remote task or a class an actor: `@remote` or `@remote(**options)`."""
    if len(args) == 1 and not options and callable(args[0]):
        return _make_remote(args[0], {})
    if args:
        raise TypeError(
            "The @remote decorator must be applied either with no arguments and no "
            "parentheses, or with keyword arguments only, e.g. @remote(num_cpus=1)."
        )
    return lambda target: _make_remote(target, options)


def _make_remote(target: Any, options: dict[str, Any]) -> Any:
    import inspect

    if inspect.isclass(target):
        from redray.actor import ActorClass

        return ActorClass.create(target, options)
    if callable(target):
        from redray.remote_function import RemoteFunction

        return RemoteFunction(target, options)
    raise TypeError("The @remote decorator must be applied to either a function or a class.")


def get(object_refs: ObjectRef | Sequence[ObjectRef], *, timeout: float | None = None) -> Any:
    """The value(s) of one ref or a list of refs, in order; raises the task's error if it failed."""
    if timeout is not None and (not isinstance(timeout, (int, float)) or timeout < 0):
        raise ValueError("'timeout' must be a non-negative number or None")
    worker = context.worker()
    if type(object_refs) is ObjectRef:
        return worker.objects.get([object_refs], timeout)[0]
    if type(object_refs) is ObjectRefGenerator:
        return object_refs  # (as Ray's: read it with next() or a for loop)
    if isinstance(object_refs, (list, tuple)):
        for ref in object_refs:
            if type(ref) is not ObjectRef:
                raise TypeError(
                    f"Invalid type of object refs, {type(ref)}, is given. 'object_refs' must "
                    "either be an ObjectRef or a list of ObjectRefs."
                )
        return worker.objects.get(list(object_refs), timeout)
    raise ValueError(
        f"Invalid type of object refs, {type(object_refs)}, is given. 'object_refs' must "
        "either be an ObjectRef or a list of ObjectRefs."
    )


def put(value: Any, *, _owner: Any = None) -> ObjectRef:
    """Store a value in the cluster; returns a ref to it."""
    return context.worker().objects.put(value)


def wait(
    object_refs: list[ObjectRef],
    *,
    num_returns: int = 1,
    timeout: float | None = None,
    fetch_local: bool = True,
) -> tuple[list[ObjectRef], list[ObjectRef]]:
    """Split refs into (ready, not ready) once num_returns are ready or timeout passes. An
    ObjectRefGenerator is ready when its next item (or its end) is."""
    if isinstance(object_refs, (ObjectRef, ObjectRefGenerator)):
        raise TypeError(
            "wait() expected a list of ray.ObjectRef or ray.ObjectRefGenerator, got a single "
            f"ray.ObjectRef or ray.ObjectRefGenerator {object_refs}"
        )
    if not isinstance(object_refs, list):
        raise TypeError(f"wait() expected a list of ray.ObjectRef, got {type(object_refs)}")
    if timeout is not None and timeout < 0:
        raise ValueError(f"The 'timeout' argument must be nonnegative. Received {timeout}")
    if not object_refs:
        return [], []
    worker = context.worker()
    if any(type(item) is ObjectRefGenerator for item in object_refs):
        return _wait_with_generators(worker, object_refs, num_returns, timeout)
    ready, not_ready = worker.objects.waiting.wait_refs(object_refs, num_returns, timeout)
    if fetch_local and ready:
        worker.objects.prefetch(ready)
    return ready, not_ready


def _wait_with_generators(
    worker: Any, items: list, num_returns: int, timeout: float | None
) -> tuple[list, list]:
    """`wait` over refs and ObjectRefGenerators: woken by any of them changing."""
    if len(set(items)) != len(items):
        raise ValueError("Wait requires a list of unique ray_waitables.")
    if num_returns <= 0 or num_returns > len(items):
        raise ValueError(f"Invalid number of objects to return {num_returns}.")
    objects, reactor = worker.objects, worker.reactor
    deadline = None if timeout is None else time.monotonic() + timeout

    def is_ready(item: Any) -> bool:
        if type(item) is ObjectRefGenerator:
            return item._stream.ready()
        return objects.payload_of(item._id) is not None

    while True:
        ready = [item for item in items if is_ready(item)][:num_returns]
        left = None if deadline is None else deadline - time.monotonic()
        if len(ready) >= num_returns or (left is not None and left <= 0):
            break
        waiter = reactor.waiter()
        for item in items:
            if type(item) is ObjectRefGenerator:
                if not item._stream.listen(waiter.set):
                    waiter.set()
            elif not is_ready(item):
                objects.on_ready(item, waiter.set)
        objects.blocking(lambda w=waiter, t=left: reactor.block(w, t, spin=True))
    chosen = set(map(id, ready))
    return ready, [item for item in items if id(item) not in chosen]


def cancel(
    object_ref: ObjectRef | ObjectRefGenerator, *, force: bool = False, recursive: bool = True
) -> None:
    """Cancel the task that makes object_ref (or the generator task of an
    ObjectRefGenerator): queued tasks never run, running ones are interrupted
    (KeyboardInterrupt), force=True kills the worker. Cancelled tasks are not retried;
    `get` raises TaskCancelledError (WorkerCrashedError with force)."""
    if type(object_ref) is ObjectRefGenerator:
        object_ref = object_ref.completed()
    if type(object_ref) is not ObjectRef:
        raise TypeError(
            f"ray.cancel() only supported for object refs. For actors, try ray.kill(). "
            f"Got: {type(object_ref)}."
        )
    worker = context.worker()
    from redray.core.ids import task_of

    actor_cancel = getattr(worker, "cancel_actor_task", None)
    if actor_cancel is not None and actor_cancel(object_ref, force, recursive):
        return
    worker.submitter.cancel(task_of(object_ref._id), force, recursive, owner=object_ref._owner)


def kill(actor: Any, *, no_restart: bool = True) -> None:
    """Kill an actor at once; its pending and future calls raise ActorDiedError."""
    from redray.actor import kill as kill_actor

    kill_actor(actor, no_restart=no_restart)


def get_actor(name: str, namespace: str | None = None) -> Any:
    """The handle of a live named actor; ValueError when there is none."""
    from redray.actor import get_actor as lookup

    return lookup(name, namespace)


def method(*args: Any, **options: Any) -> Any:
    """Options for one actor method: `@method(num_returns=2, concurrency_group="io")`."""
    from redray.actor import method as annotate

    return annotate(*args, **options)


def nodes() -> list[dict[str, Any]]:
    """Every node of the cluster with Ray's fields (NodeID, Alive, Resources, ...)."""
    worker = context.worker()
    result = []
    for info in worker.gcs.nodes():
        host, port = info["raylet_address"]
        result.append(
            {
                "NodeID": info["node_id"],
                "Alive": info["alive"],
                "alive": info["alive"],
                "NodeManagerAddress": info.get("node_ip_address", host),
                "NodeManagerHostname": info.get("hostname", ""),
                "NodeManagerPort": port,
                "ObjectManagerPort": port,
                "ObjectStoreSocketName": "",
                "RayletSocketName": "",
                "MetricsExportPort": 0,
                "NodeName": info.get("node_ip_address", host),
                "Resources": _node_resources(info) if info["alive"] else {},
                "Labels": {},
                "IsHead": info.get("is_head", False),
                "state": info.get("state"),
                "DeathReason": info.get("death_cause", ""),
                "object_store_memory": info.get("object_store_memory"),
            }
        )
    return result


def _node_resources(info: dict[str, Any]) -> dict[str, float]:
    resources = dict(info.get("resources") or {})
    if info.get("object_store_memory"):
        resources["object_store_memory"] = float(info["object_store_memory"])
    return resources


def cluster_resources() -> dict[str, float]:
    """The total resources of every live node (with `memory` and `object_store_memory`)."""
    return _sum_resources("resources")


def available_resources() -> dict[str, float]:
    """What is free now: this node's as its raylet counts it at this moment, other nodes' as
    of their last heartbeat (at most ~0.5 s old)."""
    return _sum_resources("available")


def _sum_resources(key: str) -> dict[str, float]:
    worker = context.worker()
    local = _local_resources(worker)
    total: dict[str, float] = {}
    for info in worker.gcs.nodes():
        if not info["alive"]:
            continue
        if local is not None and info["node_id"] == worker.node_id:
            info = {**info, **local}
        for name, amount in (info.get(key) or {}).items():
            total[name] = total.get(name, 0.0) + amount
        # The store's size is a (logical) resource in Ray's reports; puts do not consume it.
        store = info.get("object_store_memory")
        if store:
            total["object_store_memory"] = total.get("object_store_memory", 0.0) + float(store)
    return {k: v for k, v in total.items() if v > 1e-9 or key == "resources"}


def _local_resources(worker: Any) -> dict[str, Any] | None:
    """This node's resources straight from its raylet (None if it does not answer)."""
    from redray.core.peers import CONNECTION_LOST

    try:
        reply = worker.peers.call(worker.raylet, "resources", timeout=LOCAL_RESOURCES_TIMEOUT)
    except exceptions.GetTimeoutError:
        return None
    if reply is CONNECTION_LOST or not isinstance(reply, dict):
        return None
    return reply


def get_gpu_ids() -> list[int]:
    """GPU ids assigned to the calling task or actor."""
    from redray.runtime_context import get_runtime_context

    return [int(g) for g in get_runtime_context().get_accelerator_ids()["GPU"]]


def timeline(filename: str | None = None) -> list | None:
    """The cluster's tasks as Chrome trace events (chrome://tracing, Perfetto): one row per
    worker, one slice per task attempt that ran. Written to `filename` as JSON, or returned
    when no filename is given. Task events reach Redis within about 0.1-0.2 s of a task's end."""
    from redray.state import api as state_api  # (the state API loads on first use)

    worker = context.worker()
    worker.flush_task_events()
    return state_api.write_timeline(filename)


__all__ = [
    "available_resources",
    "cancel",
    "cluster_resources",
    "get",
    "get_actor",
    "get_gpu_ids",
    "init",
    "is_initialized",
    "kill",
    "method",
    "nodes",
    "put",
    "remote",
    "shutdown",
    "wait",
    "exceptions",
]
