"""Actors: `@remote` on a class, handles, methods, named and detached actors, `kill`.

`ActorClass.remote()` records the actor in the GCS and asks the control loop to place it; it
returns a handle at once. Method calls go straight from the caller to the actor process
(see `actor_submitter.py`); Redis only carries the actor's state changes.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import pickle
from typing import Any

from redray import options as opts
from redray.core import context, serialization
from redray.core.actor_runtime import TERMINATE, ActorExit
from redray.core.task_submitter import TaskOptions
from redray.dag.class_node import PARENT_CLASS_NODE_KEY, ClassMethodNode, ClassNode
from redray.gcs import NAMED_ACTORS
from redray.signatures import check_actor_creation, check_method

_METHOD_OPTIONS = "__redray_method_options__"

__all__ = [
    "ActorClass",
    "ActorExit",
    "ActorHandle",
    "ActorMethod",
    "exit_actor",
    "get_actor",
    "kill",
    "method",
]


def method(*args: Any, **options: Any) -> Any:
    """Annotate an actor method: `@method(num_returns=2, concurrency_group="io")`."""
    if args:
        raise ValueError("The @redray.method decorator only accepts keyword arguments.")
    opts.validate(options, "method")

    def annotate(fn: Any) -> Any:
        setattr(fn, _METHOD_OPTIONS, options)
        return fn

    return annotate


def _method_table(cls: type) -> dict[str, dict[str, Any]]:
    """What callers must know of each public method: returns, group, async-ness."""
    table: dict[str, dict[str, Any]] = {}
    for name, member in inspect.getmembers(cls):
        if name.startswith("__") and name not in ("__call__",):
            continue
        fn = member.__func__ if inspect.ismethod(member) else member
        if not (inspect.isfunction(fn) or inspect.ismethoddescriptor(fn)):
            continue
        options = getattr(fn, _METHOD_OPTIONS, {})
        is_generator = inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn)
        opts.returns(options.get("num_returns"), is_generator)  # (checked at decoration)
        table[name] = {
            "num_returns": options.get("num_returns"),  # None: 1, or "streaming" (generator)
            "is_generator": is_generator,
            "backpressure": options.get("_generator_backpressure_num_objects"),
            "concurrency_group": options.get("concurrency_group"),
            "max_task_retries": options.get("max_task_retries"),
            "retry_exceptions": options.get("retry_exceptions"),
            "is_async": inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn),
        }
    return table


class ActorClass:
    """A class made remote: create actors with `.remote(...)` or `.options(...).remote(...)`."""

    def __init__(self, cls: type, actor_options: dict[str, Any]):
        self._cls = cls
        self._options = opts.validate(dict(actor_options), "actor")
        self._methods = _method_table(cls)
        self._key: str | None = None
        self._blob: bytes | None = None
        self.__name__ = cls.__name__
        self.__qualname__ = cls.__qualname__
        self.__module__ = cls.__module__
        self.__doc__ = cls.__doc__

    @classmethod
    def create(cls, target: type, actor_options: dict[str, Any]) -> ActorClass:
        return cls(target, actor_options)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            "Actors cannot be instantiated directly. Instead of "
            f"'{self.__name__}()', use '{self.__name__}.remote()'."
        )

    def remote(self, *args: Any, **kwargs: Any) -> ActorHandle:
        """Create the actor; returns its handle at once (calls wait until it is alive)."""
        return self._create(args, kwargs, self._options)

    def options(self, **actor_options: Any) -> _BoundActorClass:
        merged = {**self._options, **opts.validate(dict(actor_options), "actor", in_options=True)}
        return _BoundActorClass(self, merged, actor_options)

    def bind(self, *args: Any, **kwargs: Any) -> ClassNode:
        """This actor as a node of a graph (`redray.dag`): each `execute` creates one."""
        return ClassNode(self._cls, args, kwargs, {}, creator=self)

    def _export(self, worker: Any) -> str:
        if self._key is None:
            try:
                self._blob = serialization.dumps_function(self._cls)
            except Exception as exc:
                raise serialization.describe_failure(self._cls, exc, "the actor class") from exc
            name = f"{getattr(self._cls, '__module__', '__main__')}.{self.__name__}"
            serialization.check_function_size(self._blob, name, "actor")
            self._key = hashlib.sha1(self._blob).hexdigest()
        worker.jobs.export_function(self._key, lambda: self._blob)
        return self._key

    def _create(self, args: tuple, kwargs: dict, options: dict[str, Any]) -> ActorHandle:
        check_actor_creation(self._cls, self._methods, args, kwargs)
        worker = context.worker()
        name = options.get("name")
        namespace = options.get("namespace") or worker.namespace
        if name and options.get("get_if_exists"):
            existing = _lookup_named(worker, name, namespace)
            if existing is not None:
                return existing
        key = self._export(worker)
        is_async = any(m["is_async"] for m in self._methods.values())
        max_concurrency = options.get("max_concurrency") or (1000 if is_async else 1)
        num_cpus = options.get("num_cpus")
        strategy_option = options.get("scheduling_strategy")
        placement, strategy = opts.placement(
            opts.task_resources(options, default_cpus=1.0), strategy_option
        )
        if num_cpus is None:
            running, _ = opts.placement(
                opts.task_resources(options, default_cpus=0.0), strategy_option
            )
        else:
            running = placement
        job = worker.jobs.current()
        runtime_env = worker.jobs.runtime_env_for(options.get("runtime_env"), job)
        actor_id = os.urandom(16)
        info = {
            "actor_id": actor_id.hex(),
            "class_name": self.__name__,
            "state": "PENDING_CREATION",
            "name": name or "",
            "namespace": namespace,
            "job_id": worker.jobs.current().job_id,
            "owner": [*worker.address[:2], worker.address[2].hex()],
            "detached": options.get("lifetime") == "detached",
            "max_restarts": options.get("max_restarts", 0),
            "max_task_retries": options.get("max_task_retries", 0),
            "num_restarts": 0,
            "methods": self._methods,
            "placement_resources": placement,
            "resources": running,
            "strategy": strategy,
            "env_vars": (runtime_env or {}).get("env_vars") or {},
            "runtime_env": runtime_env,
            "seq": 0,
        }
        submitter = worker.actors
        wire_args, wire_kwargs, keep = submitter.wire_creation_args(args, kwargs, self.__name__)
        spec = pickle.dumps(
            {
                "class_key": key,
                "class_name": self.__name__,
                "name": name or "",
                "args": wire_args,
                "kwargs": wire_kwargs,
                "max_concurrency": max_concurrency,
                "concurrency_groups": options.get("concurrency_groups") or {},
                "is_async": is_async,
                "methods": self._methods,
                "job": worker.jobs.current(),
            },
            protocol=5,
        )
        if name:
            claimed = worker.gcs.claim_name(NAMED_ACTORS, namespace, name, actor_id.hex())
            if claimed != actor_id.hex():
                if options.get("get_if_exists"):
                    existing = _lookup_named(worker, name, namespace)
                    if existing is not None:
                        return existing
                raise ValueError(
                    f"The name {name} (namespace={namespace}) is already taken. Please use a "
                    "different name or get the existing actor using "
                    f"redray.get_actor('{name}', namespace='{namespace}')"
                )
        state = submitter.create(actor_id, info, spec, keep, key)
        handle = ActorHandle(actor_id, info)
        handle._caller_state = state
        return handle


class _BoundActorClass:
    def __init__(self, actor_class: ActorClass, options: dict[str, Any], given: dict[str, Any]):
        self._actor_class = actor_class
        self._options = options
        self._given = given

    def remote(self, *args: Any, **kwargs: Any) -> ActorHandle:
        return self._actor_class._create(args, kwargs, self._options)

    def bind(self, *args: Any, **kwargs: Any) -> ClassNode:
        return ClassNode(self._actor_class._cls, args, kwargs, self._given, creator=self)


class ActorHandle:
    """A handle to an actor: call `handle.method.remote(...)`; picklable, so it can be passed."""

    def __init__(self, actor_id: bytes, info: dict[str, Any], _register: bool = True):
        self._actor_id = actor_id
        self._id = actor_id  # refcounted like an object owned by the creator
        self._owner = _owner_address(info)
        self._class_name = info["class_name"]
        self._methods = info["methods"]
        self._max_task_retries = info.get("max_task_retries", 0)
        self._info = info
        self._method_options: dict[str, Any] = {}
        self._caller_state: Any = None  # this process's view of the actor (actor_submitter)
        if _register:
            context.worker().add_local_ref(actor_id, self._owner)

    def __del__(self) -> None:
        worker = context.current
        if worker is not None:
            try:
                worker.remove_local_ref(self._id)
            except Exception:
                pass

    def __getattr__(self, name: str) -> ActorMethod:
        methods = self.__dict__.get("_methods")
        if methods is None or (name not in methods and name != TERMINATE):
            raise AttributeError(
                f"'ActorHandle' object has no attribute '{name}'"
                + (f" (class {self._class_name} has no method {name!r})" if methods else "")
            )
        # Not cached on the handle: the method refers to the handle, and a cycle would keep
        # a dropped handle (and so its actor) alive until the cyclic GC runs.
        meta = methods.get(name, {"num_returns": 1})
        options = self._method_options.get(name)
        if options is None:
            options = self._method_options[name] = _call_options(self, name, meta, {})
        return ActorMethod(self, name, meta, options)

    def __reduce__(self):
        context.note_serialized_ref(self)
        return (_rebuild_handle, (self._actor_id, self._info))

    def __repr__(self) -> str:
        return f"Actor({self._class_name}, {self._actor_id.hex()})"

    def __hash__(self) -> int:
        return hash(self._actor_id)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ActorHandle) and other._actor_id == self._actor_id

    @property
    def _actor_id_hex(self) -> str:
        return self._actor_id.hex()


def _owner_address(info: dict[str, Any]) -> tuple | None:
    owner = info.get("owner")
    if not owner:
        return None
    return (owner[0], owner[1], bytes.fromhex(owner[2]))


def _rebuild_handle(actor_id: bytes, info: dict[str, Any]) -> ActorHandle:
    handle = ActorHandle(actor_id, info, _register=False)
    scope = context.deserialize_scope()
    if scope is not None:
        scope.append(handle)
    else:
        context.count_unpickled(handle)
    return handle


class ActorMethod:
    """`handle.method`: call `.remote(...)` (or `.options(...).remote(...)`)."""

    def __init__(self, handle: ActorHandle, name: str, meta: dict[str, Any], call_options: Any):
        self._handle = handle
        self._name = name
        self._meta = meta
        self._call_options = call_options

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            "Actor methods cannot be called directly. Instead of running "
            f"'object.{self._name}()', try 'object.{self._name}.remote()'."
        )

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return _submit(self._handle, self._name, args, kwargs, self._call_options)

    def options(self, **call_options: Any) -> _BoundMethod:
        opts.validate(dict(call_options), "method")
        return _BoundMethod(
            self, _call_options(self._handle, self._name, self._meta, call_options), call_options
        )

    def bind(self, *args: Any, **kwargs: Any) -> ClassMethodNode:
        """A call on this actor as a node of a graph (`redray.dag`)."""
        return _bind_method(self._handle, self._name, args, kwargs, {})


class _BoundMethod:
    def __init__(self, actor_method: ActorMethod, call_options: Any, given: dict[str, Any]):
        self._method = actor_method
        self._call_options = call_options
        self._given = given

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return _submit(self._method._handle, self._method._name, args, kwargs, self._call_options)

    def bind(self, *args: Any, **kwargs: Any) -> ClassMethodNode:
        return _bind_method(self._method._handle, self._method._name, args, kwargs, self._given)


def _bind_method(handle: ActorHandle, name: str, args: tuple, kwargs: dict, given: dict) -> Any:
    return ClassMethodNode(name, args, kwargs, given, {PARENT_CLASS_NODE_KEY: handle})


def _call_options(handle: ActorHandle, name: str, meta: dict, overrides: dict) -> Any:
    retries = overrides.get("max_task_retries", meta.get("max_task_retries"))
    if retries is None:
        retries = handle._max_task_retries
    retry = overrides.get("retry_exceptions", meta.get("retry_exceptions")) or False
    num_returns, generator = opts.returns(
        overrides.get("num_returns", meta.get("num_returns")), bool(meta.get("is_generator"))
    )
    backpressure = overrides.get("_generator_backpressure_num_objects", meta.get("backpressure"))
    return TaskOptions(
        name=f"{handle._class_name}.{name}",
        num_returns=num_returns,
        generator=generator,
        backpressure=backpressure or -1,
        resources={},
        max_retries=retries,
        retry_exceptions=tuple(retry) if isinstance(retry, (list, tuple)) else bool(retry),
        concurrency_group=overrides.get("concurrency_group", meta.get("concurrency_group")),
    )


def _submit(handle: ActorHandle, name: str, args: tuple, kwargs: dict, call_options: Any) -> Any:
    check_method(handle._methods, name, args, kwargs)
    worker = context.worker()
    refs = worker.actors.submit(handle, name, args, kwargs, call_options)
    if call_options.num_returns == 1:
        return refs[0]
    if call_options.num_returns == 0:
        return None
    return refs


def _lookup_named(worker: Any, name: str, namespace: str) -> ActorHandle | None:
    actor_hex = worker.gcs.lookup_name(NAMED_ACTORS, namespace, name)
    if actor_hex is None:
        return None
    info = worker.gcs.actor(actor_hex)
    if info is None or info.get("state") == "DEAD":
        return None
    return _rebuild_handle(bytes.fromhex(actor_hex), info)


def get_actor(name: str, namespace: str | None = None) -> ActorHandle:
    """The handle of the live actor called `name` in `namespace` (this job's by default)."""
    if not isinstance(name, str) or not name:
        raise ValueError("Please supply a non-empty value to get_actor")
    if namespace is not None and not isinstance(namespace, str):
        raise TypeError("namespace must be None or a string")
    worker = context.worker()
    handle = _lookup_named(worker, name, namespace or worker.namespace)
    if handle is None:
        raise ValueError(
            f"Failed to look up actor with name '{name}'. This could because 1. You are trying "
            "to look up a named actor you didn't create. 2. The named actor died. 3. You did "
            "not use a namespace matching the namespace of the actor."
        )
    return handle


def kill(actor: ActorHandle, *, no_restart: bool = True) -> None:
    """Kill an actor at once (pending calls fail); with no_restart=False it may restart."""
    if not isinstance(actor, ActorHandle):
        raise ValueError(
            f"ray.kill() only supported for actors. For tasks, try ray.cancel(). Got: {type(actor)}."
        )
    worker = context.worker()
    if not isinstance(no_restart, bool):
        raise TypeError(f"no_restart must be a bool, got {type(no_restart).__name__}")
    worker.gcs.push_request("kill_actor", actor_id=actor._actor_id.hex(), no_restart=no_restart)


def exit_actor() -> None:
    """Exit the current actor once the running method returns; pending calls fail."""
    worker = context.worker()
    runtime = getattr(worker.executor, "actor", None) if worker.executor is not None else None
    if runtime is None:
        raise TypeError("exit_actor API is called on a non-actor worker.")
    runtime.request_exit("exit_actor() was called")
    raise ActorExit()


def list_named_actors(all_namespaces: bool = False) -> list:
    """Names of live named actors: this namespace's, or dicts of name/namespace for all."""
    worker = context.worker()
    entries = worker.gcs.names(NAMED_ACTORS, None if all_namespaces else worker.namespace)
    alive = []
    for namespace, name, actor_hex in entries:
        info = worker.gcs.actor(actor_hex)
        if info is None or info.get("state") == "DEAD":
            continue
        alive.append({"name": name, "namespace": namespace} if all_namespaces else name)
    return alive
