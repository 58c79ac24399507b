"""`get_runtime_context()`: who and where the calling code is (job, task, node, worker)."""

from __future__ import annotations

from typing import Any

from redray import context


class RuntimeContext:
    """A view of the current process's place in the cluster, as Ray's RuntimeContext."""

    def __init__(self, worker: Any):
        self._worker = worker

    def _task(self) -> Any:
        executor = self._worker.executor
        return executor.context() if executor is not None else None

    def get_job_id(self) -> str:
        task = self._task()
        return task.job_id if task is not None and task.job_id else self._worker.job_id

    def get_task_id(self) -> str | None:
        task = self._task()
        return task.task_id.hex() if task is not None else None

    def get_node_id(self) -> str:
        return self._worker.node_id

    def get_worker_id(self) -> str:
        return self._worker.worker_id.hex()

    def _actor(self) -> Any:
        executor = self._worker.executor
        return executor.actor if executor is not None else None

    def get_actor_id(self) -> str | None:
        actor = self._actor()
        return actor.actor_id.hex() if actor is not None else None

    def get_actor_name(self) -> str | None:
        actor = self._actor()
        if actor is None:
            return None
        info = self._worker.gcs.actor(actor.actor_id.hex()) or {}
        return info.get("name") or None

    @property
    def namespace(self) -> str:
        return self._worker.namespace

    def get_assigned_resources(self) -> dict[str, float]:
        task = self._task()
        grant = task.grant if task is not None else None
        return dict((grant or {}).get("resources") or {})

    def get_accelerator_ids(self) -> dict[str, list[str]]:
        task = self._task()
        grant = task.grant if task is not None else None
        return {"GPU": [str(g) for g in (grant or {}).get("gpu_ids") or []]}

    def get_placement_group_id(self) -> str | None:
        task = self._task()
        grant = task.grant if task is not None else None
        return (grant or {}).get("pg_id")

    @property
    def was_current_actor_reconstructed(self) -> bool:
        actor = self._actor()
        return bool(actor is not None and actor.restarted)

    @property
    def current_actor(self) -> Any:
        actor = self._actor()
        if actor is None:
            raise RuntimeError("This method is only available in an actor.")
        return actor.handle()

    def get(self) -> dict[str, Any]:
        return {
            "job_id": self.get_job_id(),
            "node_id": self.get_node_id(),
            "task_id": self.get_task_id(),
            "actor_id": self.get_actor_id(),
            "namespace": self.namespace,
        }


def get_runtime_context() -> RuntimeContext:
    """The runtime context of the calling driver, task or actor."""
    return RuntimeContext(context.worker())
