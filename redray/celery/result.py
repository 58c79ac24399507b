"""``AsyncResult`` and ``GroupResult``: a task's (or a group's) state and result, read from
the durable queue's job records."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from redray.durable import keys as K
from redray.durable.jobs import JobTimeoutError

if TYPE_CHECKING:
    from redray.celery.app import Celery


def _app(app: Celery | None) -> Celery:
    from redray.celery.app import current_app

    return app or current_app()


class AsyncResult:
    """A task's result: ``get(timeout)``, ``state``, ``ready()``, ``successful()``,
    ``result``, ``traceback``, ``revoke()``."""

    def __init__(
        self,
        id: str,  # noqa: A002 - Celery's name
        app: Celery | None = None,
        task_name: str | None = None,
        parent: AsyncResult | None = None,
    ):
        self.id = id
        self.task_id = id
        self.app = _app(app)
        self.name = task_name
        self.parent = parent

    def __repr__(self) -> str:
        return f"<AsyncResult: {self.id}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AsyncResult) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    @property
    def state(self) -> str:
        return self.app.client.state(self.id)

    status = state

    def ready(self) -> bool:
        return self.state in K.READY_STATES

    def successful(self) -> bool:
        return self.state == K.SUCCESS

    def failed(self) -> bool:
        return self.state == K.FAILURE

    def get(
        self,
        timeout: float | None = None,
        propagate: bool = True,
        interval: float = 0.5,
        disable_sync_subtasks: bool = True,
        **_: Any,
    ) -> Any:
        """Wait for the result; raise the task's exception if it failed (propagate), or
        celery.exceptions.TimeoutError (a TimeoutError) after timeout seconds."""
        return self.app.client.get(self.id, timeout, propagate)

    wait = get

    @property
    def result(self) -> Any:
        """The return value once SUCCESS, the exception once FAILURE/REVOKED, else None."""
        return self.app.client.outcome(self.id)[1]

    info = result

    @property
    def traceback(self) -> str | None:
        (tb,) = self.app.client.job_fields(self.id, "traceback")
        text = tb.decode() if isinstance(tb, bytes) else tb
        return text or None

    @property
    def retries(self) -> int:
        (retries,) = self.app.client.job_fields(self.id, "retries")
        return int(retries or 0)

    def revoke(self, terminate: bool = False, signal: Any = None, **_: Any) -> None:
        """Revoke the task if it has not run yet. terminate=True (killing a running task)
        is not supported: NotImplementedError."""
        if terminate:
            raise NotImplementedError(
                "revoke(terminate=True) is not supported by redray: a running job runs to its end"
            )
        self.app.client.revoke(self.id)

    def forget(self) -> None:
        self.app.client.forget(self.id)


class GroupResult:
    """The results of a group, in order."""

    def __init__(self, id: str, results: list[AsyncResult], app: Celery | None = None):  # noqa: A002
        self.id = id
        self.results = list(results)
        self.app = _app(app)

    def __repr__(self) -> str:
        return f"<GroupResult: {self.id} [{', '.join(r.id for r in self.results)}]>"

    def __iter__(self):
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, index: int) -> AsyncResult:
        return self.results[index]

    def _states(self) -> list[str]:
        return self.app.client.states([r.id for r in self.results])

    def ready(self) -> bool:
        return all(s in K.READY_STATES for s in self._states())

    def successful(self) -> bool:
        return all(s == K.SUCCESS for s in self._states())

    def failed(self) -> bool:
        return any(s == K.FAILURE for s in self._states())

    def completed_count(self) -> int:
        return sum(s == K.SUCCESS for s in self._states())

    def get(self, timeout: float | None = None, propagate: bool = True, **_: Any) -> list[Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        self.app.client.wait([r.id for r in self.results], timeout)
        out = []
        for r in self.results:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                out.append(r.get(timeout=remaining, propagate=propagate))
            except JobTimeoutError:
                raise
        return out

    join = get

    def revoke(self, **kwargs: Any) -> None:
        for r in self.results:
            r.revoke(**kwargs)
