"""``Task``: a function registered with a Celery app, and the ``self`` of bound tasks
(``self.request``, ``self.retry``)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import inspect
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from redray.celery.exceptions import MaxRetriesExceededError
from redray.durable import jobs as jobmod
from redray.durable.jobs import JobContext, JobOptions, JobSpec, Retry

if TYPE_CHECKING:
    from redray.celery.app import Celery
    from redray.celery.result import AsyncResult

TASK_OPTIONS = {
    "name",
    "bind",
    "max_retries",
    "default_retry_delay",
    "autoretry_for",
    "retry_backoff",
    "retry_backoff_max",
    "retry_jitter",
    "retry_kwargs",
    "rate_limit",
    "acks_late",
    "queue",
    "priority",
    "expires",
    "ignore_result",
    "base",
    "serializer",
    "track_started",
    "typing",
}
APPLY_OPTIONS = {
    "countdown",
    "eta",
    "expires",
    "queue",
    "priority",
    "task_id",
    "retry",
    "retry_policy",
    "serializer",
    "routing_key",
    "exchange",
    "link",
    "link_error",
    "headers",
    "shadow",
    "time_limit",
    "soft_time_limit",
    "ignore_result",
}
UNSUPPORTED_APPLY = {"link", "link_error", "time_limit", "soft_time_limit", "shadow"}


class Request:
    """``self.request`` of a bound task: the running job."""

    def __init__(self, job: JobContext | None):
        self.id = job.id if job else None
        self.retries = job.retries if job else 0
        self.args = job.args if job else ()
        self.kwargs = job.kwargs if job else {}
        self.delivery_info = {"routing_key": job.queue} if job else {}
        self.hostname = job.consumer if job else None
        self.called_directly = job is None
        self.task = job.name if job else None


class Task:
    """A registered task. Call it to run the function here; ``delay``/``apply_async`` to
    enqueue it."""

    def __init__(self, app: Celery, fn: Callable[..., Any] | None, name: str, options: dict):
        unknown = set(options) - TASK_OPTIONS
        if unknown:
            raise TypeError(f"unknown task options: {', '.join(sorted(unknown))}")
        if options.get("base") is not None:
            raise NotImplementedError("custom Task base classes are not supported by redray")
        self.app = app
        self.fn = fn
        self.name = name
        self.bind = bool(options.get("bind"))
        self.max_retries = options.get("max_retries", jobmod.DEFAULT_MAX_RETRIES)
        self.default_retry_delay = options.get("default_retry_delay", jobmod.DEFAULT_RETRY_DELAY)
        self.autoretry_for = tuple(options.get("autoretry_for") or ())
        retry_kwargs = options.get("retry_kwargs") or {}
        if "max_retries" in retry_kwargs:
            self.max_retries = retry_kwargs["max_retries"]
        backoff = options.get("retry_backoff", False)
        self.retry_backoff = float(backoff) if not isinstance(backoff, bool) else float(backoff)
        self.retry_backoff_max = options.get("retry_backoff_max", jobmod.DEFAULT_BACKOFF_MAX)
        self.retry_jitter = options.get("retry_jitter", True)
        self.rate_limit = jobmod.parse_rate(
            options.get("rate_limit", app.conf.get("task_default_rate_limit"))
        )
        self.queue = options.get("queue")
        self.priority = options.get("priority")
        self.expires = options.get("expires")
        self.acks_late = True
        self._local = threading.local()
        if fn is not None:
            self.__doc__ = fn.__doc__
            self.__wrapped__ = fn
            self.__name__ = getattr(fn, "__name__", name)
            self.__module__ = getattr(fn, "__module__", __name__)
            self.__qualname__ = getattr(fn, "__qualname__", name)

    @staticmethod
    def name_for(fn: Callable[..., Any], options: dict) -> str:
        return options.get("name") or f"{fn.__module__}.{fn.__name__}"

    @classmethod
    def from_function(cls, app: Celery, fn: Callable[..., Any], options: dict) -> Task:
        return cls(app, fn, cls.name_for(fn, options), options)

    @classmethod
    def named(cls, app: Celery, name: str) -> Task:
        """A task known only by name (``send_task``): enqueued, never run here."""
        return cls(app, None, name, {})

    def __repr__(self) -> str:
        return f"<@task: {self.name} of {self.app.main} (redray)>"

    def __reduce__(self) -> Any:
        return (_task_by_name, (self.name, getattr(self.fn, "__module__", None)))

    # -- running ---------------------------------------------------------------------------
    @property
    def request(self) -> Request:
        return getattr(self._local, "request", None) or Request(None)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        if self.fn is None:
            raise jobmod.NotRegisteredError(f"task {self.name!r} is not registered here")
        if self.bind:
            return self.fn(self, *args, **kwargs)
        return self.fn(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.run(*args, **kwargs)

    def retry(
        self,
        args: Any = None,
        kwargs: Any = None,
        exc: BaseException | None = None,
        throw: bool = True,
        eta: _dt.datetime | None = None,
        countdown: float | None = None,
        max_retries: int | None = None,
        **options: Any,
    ) -> Retry:
        """Run this job again later (raises, as Celery's). Past max_retries, raises exc (or
        MaxRetriesExceededError). New args/kwargs are not supported."""
        if args is not None or kwargs is not None:
            raise NotImplementedError("retry() with new args/kwargs is not supported by redray")
        request = self.request
        limit = self.max_retries if max_retries is None else max_retries
        if limit is not None and request.retries >= limit:
            if exc is not None:
                raise exc
            raise MaxRetriesExceededError(
                f"Can't retry {self.name}[{request.id}] args:{request.args} kwargs:{request.kwargs}"
            )
        if countdown is None and eta is None:
            countdown = self.default_retry_delay
        retry = Retry(exc=exc, countdown=countdown, eta=eta, max_retries=limit)
        if throw:
            raise retry
        return retry

    # -- enqueueing -------------------------------------------------------------------------
    def job_options(self) -> JobOptions:
        return JobOptions(
            max_retries=self.max_retries,
            default_retry_delay=float(self.default_retry_delay),
            retry_backoff=self.retry_backoff,
            retry_backoff_max=float(self.retry_backoff_max),
            retry_jitter=bool(self.retry_jitter),
            autoretry_for=[jobmod.exception_path(t) for t in self.autoretry_for],
            rate_limit=self.rate_limit,
        ).check()

    def make_spec(
        self,
        args: Any = None,
        kwargs: Any = None,
        options: dict | None = None,
        leading: int = 0,
    ) -> JobSpec:
        """The job apply_async would enqueue (options checked here); leading: arguments
        that will come first at run time (a previous step's result)."""
        options = dict(options or {})
        unknown = set(options) - APPLY_OPTIONS
        if unknown:
            raise TypeError(f"unknown apply_async options: {', '.join(sorted(unknown))}")
        unsupported = UNSUPPORTED_APPLY & {k for k, v in options.items() if v}
        if unsupported:
            raise NotImplementedError(
                f"apply_async options not supported by redray: {', '.join(sorted(unsupported))}"
            )
        if options.get("countdown") is not None and options.get("eta") is not None:
            raise ValueError("give countdown or eta, not both")
        args = tuple(args or ())
        kwargs = dict(kwargs or {})
        if self.fn is not None:
            _check_call(self, (None,) * leading + args, kwargs)
        queue = (
            options.get("queue")
            or self.queue
            or self.app.route(self.name).get("queue")
            or self.app.default_queue
        )
        now = jobmod.to_ms(_now())
        due = 0
        if options.get("countdown") is not None:
            due = now + int(float(options["countdown"]) * 1000)
        elif options.get("eta") is not None:
            due = jobmod.to_ms(options["eta"])
        expires = options.get("expires", self.expires)
        expires_ms = 0
        if expires is not None:
            if isinstance(expires, _dt.datetime):
                expires_ms = jobmod.to_ms(expires)
            else:
                expires_ms = now + int(float(expires) * 1000)
        priority = options.get("priority", self.priority)
        if priority is None:
            priority = self.app.conf.get("task_default_priority")
        jobmod.level_of(priority)
        return JobSpec(
            name=self.name,
            args=args,
            kwargs=kwargs,
            queue=queue,
            job_id=options.get("task_id") or jobmod.new_job_id(),
            priority=priority,
            due_ms=due,
            expires_ms=expires_ms,
            result_ttl=self.app.result_ttl,
            options=self.job_options(),
        )

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> AsyncResult:
        from redray.celery.result import AsyncResult

        spec = self.make_spec(args, kwargs, options)
        self.app.client.enqueue(spec)
        return AsyncResult(spec.job_id, app=self.app, task_name=self.name)

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult:
        return self.apply_async(args, kwargs)

    def AsyncResult(self, task_id: str) -> AsyncResult:  # noqa: N802 - Celery's name
        from redray.celery.result import AsyncResult

        return AsyncResult(task_id, app=self.app, task_name=self.name)

    # -- signatures ---------------------------------------------------------------------------
    def signature(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        from redray.celery.canvas import Signature

        return Signature(self.name, args or (), kwargs or {}, options, app=self.app, task_obj=self)

    def s(self, *args: Any, **kwargs: Any) -> Any:
        return self.signature(args, kwargs)

    def si(self, *args: Any, **kwargs: Any) -> Any:
        sig = self.signature(args, kwargs)
        sig.immutable = True
        return sig


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _check_call(task: Task, args: tuple, kwargs: dict) -> None:
    """A call that cannot bind to the function's signature fails here, as Celery's
    ``typing`` check does."""
    try:
        sig = inspect.signature(task.fn)
    except (TypeError, ValueError):
        return
    try:
        if task.bind:
            sig.bind(None, *args, **kwargs)
        else:
            sig.bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"{task.name}() {exc}") from None


@contextlib.contextmanager
def _bind_request(task: Task, job: JobContext) -> Iterator[None]:
    previous = getattr(task._local, "request", None)
    task._local.request = Request(job)
    try:
        yield
    finally:
        task._local.request = previous


def _task_by_name(name: str, module: str | None) -> Task:
    """Unpickle a task: the one registered under its name (importing its module)."""
    from redray.celery.app import _apps

    if module:
        __import__(module)
    for app in _apps:
        if name in app.tasks:
            return app.tasks[name]
    raise jobmod.NotRegisteredError(f"task {name!r} is not registered")
