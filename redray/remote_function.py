"""`@remote` on a function: a `RemoteFunction` whose `.remote()` submits a task."""

from __future__ import annotations

import functools
import hashlib
import inspect
from typing import Any

from redray import options as opts
from redray.core import context, serialization
from redray.core.executor import CallLimit
from redray.core.task_submitter import TaskOptions
from redray.dag.function_node import FunctionNode
from redray.signatures import Binder

# A pickled function or class above these sizes (bytes) draws a warning / is refused (Ray's
# values): it almost always captured a large object by accident, which every worker would load.


class RemoteFunction:
    """A function that runs as a task in the cluster: call `.remote(...)`, not `(...)`."""

    def __init__(self, function: Any, task_options: dict[str, Any]):
        if inspect.iscoroutinefunction(function):
            raise ValueError(
                "'async def' should not be used for remote tasks. You can wrap the "
                "async function with `asyncio.run(f())`. See more at:"
                "https://docs.ray.io/en/latest/ray-core/actors/async_api.html "
            )
        self._function = function
        self._options = opts.validate(dict(task_options), "task")
        self._name = getattr(function, "__qualname__", getattr(function, "__name__", "task"))
        self._binder = Binder(function)
        self._is_generator = inspect.isgeneratorfunction(function)
        opts.returns(self._options.get("num_returns"), self._is_generator)  # (checked now)
        self._key: str | None = None
        self._blob: bytes | None = None
        self._task_options: TaskOptions | None = None
        functools.update_wrapper(self, function)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = getattr(self._function, "__module__", "__main__")
        raise TypeError(
            "Remote functions cannot be called directly. Instead of running "
            f"'{module}.{self._name}()', try '{module}.{self._name}.remote()'."
        )

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """Submit the task; returns an ObjectRef (a list of them for num_returns > 1, an
        ObjectRefGenerator for a generator function)."""
        if self._task_options is None:
            self._task_options = self._build(self._options)
        return self._submit(args, kwargs, self._task_options)

    def options(self, **task_options: Any) -> _BoundOptions:
        """The same function with some options overridden for the next calls."""
        merged = {**self._options, **opts.validate(dict(task_options), "task", in_options=True)}
        return _BoundOptions(self, self._build(merged), task_options)

    def bind(self, *args: Any, **kwargs: Any) -> FunctionNode:
        """This task as a node of a graph (`redray.dag`), run by the graph's `execute`."""
        return FunctionNode(self._function, args, kwargs, {}, submitter=self)

    def _build(self, options: dict[str, Any]) -> TaskOptions:
        retry = options.get("retry_exceptions", False)
        resources, strategy = opts.placement(
            opts.task_resources(options), options.get("scheduling_strategy")
        )
        num_returns, generator = opts.returns(options.get("num_returns"), self._is_generator)
        return TaskOptions(
            name=options.get("name") or self._name,
            num_returns=num_returns,
            generator=generator,
            backpressure=options.get("_generator_backpressure_num_objects") or -1,
            resources=resources,
            max_retries=options.get("max_retries", 3),
            retry_exceptions=tuple(retry) if isinstance(retry, (list, tuple)) else bool(retry),
            runtime_env=options.get("runtime_env"),
            strategy=strategy,
        )

    def _export(self, worker: Any) -> str:
        if self._key is None:
            max_calls = self._options.get("max_calls") or 0
            exported = CallLimit(self._function, max_calls) if max_calls else self._function
            try:
                blob = serialization.dumps_function(exported)
            except Exception as exc:
                raise serialization.describe_failure(
                    self._function, exc, "the remote function"
                ) from exc
            function = self._function
            name = getattr(function, "__name__", self._name)
            name = f"{getattr(function, '__module__', '__main__')}.{name}"
            serialization.check_function_size(blob, name, "remote function")
            self._blob = blob
            self._key = hashlib.sha1(blob).hexdigest()
        worker.jobs.export_function(self._key, lambda: self._blob)
        return self._key

    def _submit(self, args: tuple, kwargs: dict, task_options: TaskOptions) -> Any:
        self._binder.check(args, kwargs)
        worker = context.worker()
        key = self._export(worker)
        refs = worker.submitter.submit(key, args, kwargs, task_options)
        if task_options.num_returns == 1:
            return refs[0]
        if task_options.num_returns == 0:
            return None
        return refs


class _BoundOptions:
    """What `.options(...)` returns: `.remote()` with those options."""

    def __init__(self, function: RemoteFunction, task_options: TaskOptions, given: dict):
        self._function = function
        self._task_options = task_options
        self._given = given

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return self._function._submit(args, kwargs, self._task_options)

    def bind(self, *args: Any, **kwargs: Any) -> FunctionNode:
        return FunctionNode(self._function._function, args, kwargs, self._given, submitter=self)
