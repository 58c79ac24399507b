"""`get_runtime_context()`: who and where the calling code is (job, task, actor, node, worker).

Names, return types and which values a driver, a task and an actor see follow Ray 2.60's
RuntimeContext: `get_*` methods return hex strings (None where there is no such thing), the
older properties (`job_id`, `node_id`, `task_id`, `actor_id`) and `get()` return id objects.
"""

from __future__ import annotations

import inspect
from typing import Any

from redray.core import context
from redray.core.ids import ActorID, JobID, NodeID, TaskID
from redray.resources import plain_name


class RuntimeContext:
    """A view of the current process's place in the cluster, as Ray's RuntimeContext."""

    def __init__(self, worker: Any):
        self._worker = worker

    @property
    def worker(self) -> Any:
        return self._worker

    def _in_worker(self) -> bool:
        """A worker process (task or actor), not a driver: Ray's WORKER_MODE."""
        return self._worker.executor is not None

    def _task(self) -> Any:
        executor = self._worker.executor
        return executor.context() if executor is not None else None

    def _actor(self) -> Any:
        executor = self._worker.executor
        return executor.actor if executor is not None else None

    # -- ids --------------------------------------------------------------------------------
    def get_job_id(self) -> str:
        task = self._task()
        return task.job_id if task is not None and task.job_id else self._worker.job_id

    def get_task_id(self) -> str | None:
        task = self._task()
        return task.task_id.hex() if task is not None and task.task_id else None

    def get_node_id(self) -> str:
        return self._worker.node_id

    def get_worker_id(self) -> str:
        return self._worker.worker_id.hex()

    def get_actor_id(self) -> str | None:
        actor = self._actor()
        return actor.actor_id.hex() if actor is not None else None

    @property
    def job_id(self) -> JobID:
        return JobID.from_hex(self.get_job_id())

    @property
    def node_id(self) -> NodeID:
        return NodeID.from_hex(self.get_node_id())

    @property
    def task_id(self) -> TaskID | None:
        assert self._in_worker(), "This method is only available when the process is a worker."
        task_id = self.get_task_id()
        return TaskID.from_hex(task_id) if task_id is not None else None

    @property
    def actor_id(self) -> ActorID | None:
        assert self._in_worker(), "This method is only available when the process is a worker."
        actor_id = self.get_actor_id()
        return ActorID.from_hex(actor_id) if actor_id is not None else None

    @property
    def namespace(self) -> str:
        return self._worker.namespace

    def get(self) -> dict[str, Any]:
        """job_id, node_id and namespace; task_id and actor_id where there is one (as Ray:
        absent, not None, elsewhere)."""
        found: dict[str, Any] = {
            "job_id": self.job_id,
            "node_id": self.node_id,
            "namespace": self.namespace,
        }
        if self._in_worker():
            task_id = self.task_id
            if task_id is not None:
                found["task_id"] = task_id
            actor_id = self.actor_id
            if actor_id is not None:
                found["actor_id"] = actor_id
        return found

    # -- the running task -------------------------------------------------------------------
    def get_task_name(self) -> str | None:
        """The task's name (its function's, `Class.method` for actor calls, or the one set
        with `.options(name=...)`); None outside a task."""
        task = self._task() if self._in_worker() else None
        return task.name if task is not None else None

    def get_task_function_name(self) -> str | None:
        """`module.function` (or `module.Class.method`) of what the task runs."""
        task = self._task() if self._in_worker() else None
        if task is None or task.function is None:
            return None
        return _function_name(task.function)

    def get_actor_name(self) -> str | None:
        """The actor's name ("" if it has none); None outside an actor."""
        actor = self._actor()
        return actor.actor_name if actor is not None else None

    @property
    def was_current_actor_reconstructed(self) -> bool:
        actor = self._actor()
        return bool(actor is not None and actor.restarted)

    @property
    def current_actor(self) -> Any:
        actor = self._actor()
        if actor is None:
            raise RuntimeError("This method is only available in an actor.")
        from redray.actor import ActorHandle  # (the core, imported only once it is running)

        info = self._worker.gcs.actor(actor.actor_id.hex()) or {}
        return ActorHandle(actor.actor_id, info)

    # -- resources --------------------------------------------------------------------------
    def _grant(self) -> dict[str, Any]:
        task = self._task()
        return (task.grant if task is not None else None) or {}

    def get_assigned_resources(self) -> dict[str, float]:
        """What the task or actor holds while it runs, by the names it asked for (a
        placement group's bundle resources under their plain names)."""
        resources = {}
        for name, amount in (self._grant().get("resources") or {}).items():
            plain = plain_name(name)
            if plain is not None:
                resources[plain] = float(amount)
        return resources

    def get_accelerator_ids(self) -> dict[str, list[str]]:
        """The ids of the accelerators the task or actor holds, by Ray's accelerator names
        (GPUs are the only kind redray assigns: the others are always empty)."""
        ids: dict[str, list[str]] = {name: [] for name in ACCELERATOR_NAMES}
        ids["GPU"] = [str(g) for g in self._grant().get("gpu_ids") or []]
        return ids

    def get_resource_ids(self) -> dict[str, list[str]]:
        return self.get_accelerator_ids()

    def get_placement_group_id(self) -> str | None:
        return self._grant().get("pg_id")

    @property
    def should_capture_child_tasks_in_placement_group(self) -> bool:
        return bool(self._grant().get("capture"))


# The accelerator resources Ray 2.60 reports ids for (get_accelerator_ids's keys).
ACCELERATOR_NAMES = ("GPU", "TPU", "NPU", "HPU", "neuron_cores", "RBLN", "FURIOSA", "MBLT", "TTNPU")


def _function_name(function: Any) -> str:
    """Ray's function descriptor string: `module.qualname`, the module of a script run as
    `__main__` named after its file (as the script's own module would be)."""
    if inspect.ismethod(function):
        owner = function.__self__
        cls = owner if inspect.isclass(owner) else type(owner)
        return f"{_module_name(cls, function)}.{cls.__qualname__}.{function.__name__}"
    qualname = getattr(function, "__qualname__", None) or getattr(function, "__name__", "")
    return f"{_module_name(function, function)}.{qualname}"


def _module_name(obj: Any, code_of: Any) -> str:
    module = getattr(obj, "__module__", None) or "__main__"
    if module != "__main__":
        return module
    code = getattr(inspect.unwrap(getattr(code_of, "__func__", code_of)), "__code__", None)
    if code is None and inspect.isclass(code_of):
        code = getattr(getattr(code_of, "__init__", None), "__code__", None)
    stem = inspect.getmodulename(code.co_filename) if code is not None else None
    return stem or module


def get_runtime_context() -> RuntimeContext:
    """The runtime context of the calling driver, task or actor."""
    return RuntimeContext(context.worker())
