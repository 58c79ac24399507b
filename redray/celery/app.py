"""``Celery``: a Celery application whose broker and result backend are redray's durable
queues (redray/durable/), in the cluster whose Redis the broker URL names.

What Celery's app does that matters to a project is here: the task decorator and registry,
``conf`` (routes, beat schedule, result expiry...), ``send_task``, ``AsyncResult``, and
running workers (``redray worker -A proj``, or ``app.start_worker()``) and the beat
scheduler. Settings redray does not use are ignored, with one warning listing them.
"""

from __future__ import annotations

import fnmatch
import logging
import threading
from collections.abc import Callable
from typing import Any

from redray.celery.task import Task, _bind_request
from redray.core import context
from redray.durable import beat as beatmod
from redray.durable import jobs as jobmod
from redray.durable.actors import Consumers, consume
from redray.durable.client import QueueClient, connect
from redray.durable.consumer import ConsumerSettings
from redray.durable.jobs import JobContext, JobSpec

logger = logging.getLogger(__name__)

# Settings redray reads (everything else is ignored, with one warning).
KNOWN_SETTINGS = {
    "broker_url",
    "result_backend",
    "task_routes",
    "task_default_queue",
    "task_default_priority",
    "task_default_rate_limit",
    "task_acks_late",  # acknowledgement is always after the result is stored
    "task_track_started",  # STARTED is always recorded
    "result_expires",
    "beat_schedule",
    "timezone",
    "enable_utc",
    "task_serializer",
    "result_serializer",
    "accept_content",
    "worker_prefetch_multiplier",
    "broker_connection_retry_on_startup",
    "imports",
    "include",
}
DEFAULT_QUEUE = "celery"  # Celery's task_default_queue

_shared_tasks: list[Callable[[Celery], Any]] = []
_apps: list[Celery] = []
_default_app: list[Celery] = []


class Settings(dict):
    """``app.conf``: a dict whose keys are also attributes (``app.conf.result_expires``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def update(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        super().update(*args, **kwargs)

    def unknown(self) -> list[str]:
        return sorted(k for k in self if k not in KNOWN_SETTINGS)


class Celery:
    """A Celery app on redray: ``Celery("proj", broker="redis://...")``; a ``redis://``
    broker is the Redis of the redray cluster whose queues to use (default: the cluster this
    process is connected to, else the one ``redray start`` runs here)."""

    def __init__(
        self,
        main: str | None = None,
        broker: str | None = None,
        backend: str | None = None,
        include: list[str] | None = None,
        **settings: Any,
    ):
        self.main = main
        self.conf = Settings(settings)
        if broker:
            self.conf["broker_url"] = broker
        if backend:
            self.conf["result_backend"] = backend
        if include:
            self.conf["include"] = list(include)
        self.tasks: dict[str, Task] = {}
        self._client: QueueClient | None = None
        self._client_for: Any = None
        self._lock = threading.Lock()
        self._warned = False
        _apps.append(self)
        if not _default_app:
            _default_app.append(self)
        for register in _shared_tasks:
            register(self)

    def __repr__(self) -> str:
        return f"<Celery {self.main} (redray)>"

    # -- configuration -------------------------------------------------------------------
    def config_from_object(self, obj: Any, namespace: str | None = None, **_: Any) -> None:
        """Read settings from an object or module (or its dotted name); with namespace
        "CELERY", only CELERY_-prefixed upper-case names, lower-cased without the prefix."""
        if isinstance(obj, str):
            obj = jobmod.import_by_name(obj) or __import__(obj)
        prefix = f"{namespace}_" if namespace else ""
        for name in dir(obj):
            if name.startswith("_"):
                continue
            if prefix:
                if not name.startswith(prefix):
                    continue
                key = name[len(prefix) :].lower()
            else:
                key = name
            self.conf[key] = getattr(obj, name)

    def _warn_unknown(self) -> None:
        if not self._warned:
            self._warned = True
            unknown = self.conf.unknown()
            if unknown:
                logger.warning("redray.celery ignores these settings: %s", ", ".join(unknown))

    @property
    def client(self) -> QueueClient:
        """The durable queues of the broker's cluster (connected on first use; without a
        broker URL, those of the cluster this process is connected to now)."""
        with self._lock:
            broker = self.conf.get("broker_url")
            current = context.current
            where = broker if broker or current is None else (current.gcs.url, current.gcs.cluster)
            if self._client is None or where != self._client_for:
                self._warn_unknown()
                self._client = QueueClient(connect(broker))
                self._client_for = where
            return self._client

    @property
    def result_ttl(self) -> float:
        expires = self.conf.get("result_expires", jobmod.DEFAULT_RESULT_TTL)
        if expires is None:
            return 0.0
        return expires.total_seconds() if hasattr(expires, "total_seconds") else float(expires)

    # -- tasks -----------------------------------------------------------------------------
    def task(self, *args: Any, **options: Any) -> Any:
        """``@app.task`` or ``@app.task(bind=True, name=..., max_retries=...)``."""
        if len(args) == 1 and callable(args[0]) and not options:
            return self._register(args[0], {})
        if args:
            raise TypeError("@app.task takes keyword options only")

        def decorate(fn: Callable[..., Any]) -> Task:
            return self._register(fn, options)

        return decorate

    def _register(self, fn: Callable[..., Any], options: dict[str, Any]) -> Task:
        task = Task.from_function(self, fn, options)
        self.tasks[task.name] = task
        return task

    def route(self, name: str) -> dict[str, Any]:
        """The routing options (queue...) ``task_routes`` gives the task name."""
        routes = self.conf.get("task_routes") or {}
        for table in routes if isinstance(routes, (list, tuple)) else [routes]:
            if callable(table):
                raise NotImplementedError("task_routes given as functions are not supported")
            for pattern, route in table.items():
                if fnmatch.fnmatchcase(name, pattern):
                    return dict(route) if isinstance(route, dict) else {"queue": str(route)}
        return {}

    @property
    def default_queue(self) -> str:
        return self.conf.get("task_default_queue") or DEFAULT_QUEUE

    def send_task(
        self,
        name: str,
        args: Any = None,
        kwargs: Any = None,
        **options: Any,
    ) -> Any:
        """Enqueue a task by name (it need not be registered here)."""
        task = self.tasks.get(name) or Task.named(self, name)
        return task.apply_async(args, kwargs, **options)

    def AsyncResult(self, task_id: str, **_: Any) -> Any:  # noqa: N802 - Celery's name
        from redray.celery.result import AsyncResult

        return AsyncResult(task_id, app=self)

    def GroupResult(self, group_id: str, results: list | None = None) -> Any:  # noqa: N802
        from redray.celery.result import GroupResult

        return GroupResult(group_id, results or [], app=self)

    def signature(self, name: str, args: Any = (), kwargs: Any = None, **options: Any) -> Any:
        from redray.celery.canvas import Signature

        return Signature(name, args, kwargs, options, app=self)

    # -- workers -----------------------------------------------------------------------------
    def durable_handlers(
        self,
    ) -> tuple[Callable[[str], Any], Callable[..., Any]]:
        """How a consumer finds and runs this app's tasks: by registered name (or import)."""
        for module in self.conf.get("include") or self.conf.get("imports") or ():
            __import__(module)

        def lookup(name: str) -> Any:
            task = self.tasks.get(name)
            if task is None:
                found = jobmod.import_by_name(name)
                return found if isinstance(found, Task) else None
            return task

        def run(task: Task, job: JobContext, args: tuple, kwargs: dict) -> Any:
            with _bind_request(task, job):
                return task.run(*args, **kwargs)

        return lookup, run

    def queues_in_use(self) -> list[str]:
        queues = {self.default_queue}
        for task in self.tasks.values():
            queues.add(task.queue or self.route(task.name).get("queue") or self.default_queue)
        return sorted(queues)

    def start_worker(
        self,
        queues: list[str] | None = None,
        concurrency: int = 1,
        threads: int = 1,
        prefetch: int = 4,
        heartbeat_ttl: float = 10.0,
        resources: dict[str, float] | None = None,
        app_path: str | None = None,
        sys_path: list[str] | None = None,
    ) -> Consumers:
        """Start ``concurrency`` consumer actors (as ``celery worker -c``) taking the jobs
        of queues (default: the default queue). The consumers import the app by app_path
        ("module" or "module:attribute"; default: the module that defines this app)."""
        target = app_path or self.main_module()
        client = self.client
        settings = ConsumerSettings(prefetch=prefetch, heartbeat_ttl=heartbeat_ttl)
        return consume(
            client.gcs.url,
            client.gcs.cluster,
            list(queues or [self.default_queue]),
            target,
            settings,
            num_consumers=concurrency,
            concurrency=threads,
            resources=resources,
            sys_path=sys_path,
        )

    def main_module(self) -> str:
        """Where consumers import this app from: the module that made it."""
        for task in self.tasks.values():
            module = getattr(task.fn, "__module__", None)
            if module and module != "__main__":
                return module
        if self.main and self.main != "__main__":
            return self.main
        raise ValueError("cannot tell which module defines this app: give app_path")

    def beat_entries(self) -> list[beatmod.Entry]:
        entries = []
        for name, entry in (self.conf.get("beat_schedule") or {}).items():
            task_name = entry["task"]
            schedule = beatmod.as_schedule(entry["schedule"])
            options = dict(entry.get("options") or {})

            def make_job(
                job_id: str,
                task_name: str = task_name,
                args: Any = entry.get("args") or (),
                kwargs: Any = entry.get("kwargs") or {},
                options: dict = options,
            ) -> JobSpec:
                task = self.tasks.get(task_name) or Task.named(self, task_name)
                return task.make_spec(args, kwargs, dict(options, task_id=job_id))

            entries.append(beatmod.Entry(name, schedule, make_job))
        return entries

    def start_beat(self, tick: float = 0.5, lease_ttl: float = 5.0) -> beatmod.Beat:
        """Run the beat scheduler of ``conf.beat_schedule`` in a thread of this process
        (fenced: only one scheduler of the app fires at a time)."""
        return beatmod.Beat(
            self.client, self.main or "celery", self.beat_entries(), tick, lease_ttl
        ).start()


def shared_task(*args: Any, **options: Any) -> Any:
    """``@shared_task``: a task registered with every app (made before or after)."""

    def decorate(fn: Callable[..., Any]) -> Any:
        def register(app: Celery) -> Task:
            return app._register(fn, options)

        _shared_tasks.append(register)
        for app in _apps:
            register(app)
        if not _default_app:
            Celery()
        return _default_app[0].tasks[Task.name_for(fn, options)]

    if len(args) == 1 and callable(args[0]) and not options:
        return decorate(args[0])
    return decorate


def current_app() -> Celery:
    if not _default_app:
        Celery()
    return _default_app[0]
