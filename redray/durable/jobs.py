"""What a durable job is: its options, how its call and result are encoded, how long it waits
before a retry, and the context a running job sees.

Pure data and functions: no Redis here (redray/durable/client.py writes jobs, the consumer
runs them).
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import math
import pickle
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cloudpickle

from redray.durable.keys import LEVELS

DEFAULT_QUEUE = "default"
DEFAULT_MAX_RETRIES = 3  # Celery's Task.max_retries
DEFAULT_RETRY_DELAY = 180.0  # Celery's Task.default_retry_delay (s)
DEFAULT_BACKOFF_MAX = 600.0  # Celery's retry_backoff_max (s)
DEFAULT_RESULT_TTL = 86_400.0  # Celery's result_expires: one day (s)
DEFAULT_MAX_DELIVERIES = 10  # a job whose consumer died this many times goes to the DLQ


class JobError(Exception):
    """Base of the durable queue's own errors."""


class JobTimeoutError(JobError, TimeoutError):
    """A job's result did not arrive within the time given to ``get``."""


class JobRevokedError(JobError):
    """The job was revoked (or expired) before it ran: it has no result."""


class JobFailedError(JobError):
    """The job failed and its exception could not be rebuilt here; the message has its
    remote error and traceback."""


class NotRegisteredError(JobError):
    """No consumer knows a function by the job's name (it is not registered with the
    consumer and cannot be imported by its dotted name)."""


class WorkerLostError(JobError):
    """The consumers running the job died too many times (``max_deliveries``): it is given
    up and dead-lettered instead of taking down every consumer that picks it up."""


class ChordError(JobError):
    """A chord's callback did not run because a job of its header failed."""


class Retry(Exception):  # noqa: N818 - Celery's name
    """Raised by a running job to be run again later: ``raise Retry(countdown=5)``.

    ``countdown``/``eta`` say when (default: the job's retry delay, or its backoff);
    ``exc`` is the error recorded (and raised by ``get`` once retries are exhausted);
    ``max_retries`` overrides the job's."""

    def __init__(
        self,
        exc: BaseException | None = None,
        countdown: float | None = None,
        eta: float | _dt.datetime | None = None,
        max_retries: int | None = None,
    ):
        super().__init__(f"retry requested: {exc!r}" if exc is not None else "retry requested")
        self.exc = exc
        self.countdown = countdown
        self.eta = eta
        self.max_retries = max_retries


def function_name(fn: Any) -> str:
    """The name a job refers to its function by: Celery's default ``module.qualname``."""
    if isinstance(fn, str):
        if not fn:
            raise ValueError("a job's function name cannot be empty")
        return fn
    name = getattr(fn, "name", None)  # a Celery-style task object
    if isinstance(name, str) and name:
        return name
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not module or not qualname:
        raise TypeError(f"a job runs a function or a function name, got {fn!r}")
    return f"{module}.{qualname}"


def import_by_name(name: str) -> Any:
    """The object a dotted ``module.qualname`` names; None when it cannot be imported."""
    parts = name.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attr in parts[split:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def dumps(value: Any) -> bytes:
    """Pickle (protocol 5), falling back to cloudpickle for lambdas and local classes."""
    try:
        return pickle.dumps(value, protocol=5)
    except Exception:
        return cloudpickle.dumps(value, protocol=5)


def loads(blob: bytes | None) -> Any:
    return None if not blob else pickle.loads(blob)


def to_ms(moment: float | _dt.datetime) -> int:
    """A wall-clock time (epoch seconds or a datetime, naive = local time) in epoch ms."""
    if isinstance(moment, _dt.datetime):
        moment = moment.timestamp()
    if isinstance(moment, bool) or not isinstance(moment, (int, float)) or math.isnan(moment):
        raise TypeError(f"expected a time (epoch seconds or datetime), got {moment!r}")
    return int(moment * 1000)


def level_of(priority: int | None) -> int:
    """The stream level of a priority 0-9 (0 is served first, as Celery's Redis transport)."""
    if priority is None:
        return 0
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 9:
        raise ValueError(f"priority is an integer from 0 (first) to 9, got {priority!r}")
    return min(LEVELS - 1, (priority + 2) // 3)


def parse_rate(rate: str | float | int | None) -> float:
    """Celery's rate limit syntax ("10/s", "100/m", "1000/h", or a number per second) in
    jobs per second; 0 for no limit."""
    if rate is None or rate == "" or rate == 0:
        return 0.0
    if isinstance(rate, (int, float)) and not isinstance(rate, bool):
        if rate < 0:
            raise ValueError(f"a rate limit is positive, got {rate!r}")
        return float(rate)
    if not isinstance(rate, str):
        raise TypeError(f"a rate limit is a number or a string like '10/s', got {rate!r}")
    amount, _, unit = rate.partition("/")
    seconds = {"": 1, "s": 1, "m": 60, "h": 3600}.get(unit.strip())
    try:
        value = float(amount)
    except ValueError:
        value = -1
    if seconds is None or value < 0:
        raise ValueError(f"a rate limit looks like '10/s', '100/m' or '1000/h', got {rate!r}")
    return value / seconds


def backoff_seconds(
    retries: int, factor: float, maximum: float, jitter: bool, rng: random.Random
) -> float:
    """Celery's exponential backoff: ``factor * 2**retries`` capped at maximum, and with
    jitter a uniform draw below it (so retries of many jobs do not arrive together)."""
    countdown = min(maximum, factor * (2**retries))
    if jitter:
        countdown = rng.uniform(0, countdown)
    return max(0.0, countdown)


@dataclass
class JobOptions:
    """How a job is run, retried and kept (stored with it as JSON)."""

    max_retries: int | None = DEFAULT_MAX_RETRIES  # None: retry for ever
    default_retry_delay: float = DEFAULT_RETRY_DELAY
    retry_backoff: float = 0.0  # factor in seconds (Celery's True is 1); 0: fixed delay
    retry_backoff_max: float = DEFAULT_BACKOFF_MAX
    retry_jitter: bool = True
    autoretry_for: list[str] = field(default_factory=list)  # exception class paths
    max_deliveries: int = DEFAULT_MAX_DELIVERIES
    rate_limit: float = 0.0  # per job name, jobs/s, across every consumer
    pass_parent: bool = False  # a chain step gets the previous step's result first

    def to_json(self) -> str:
        return json.dumps(self.__dict__, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes | None) -> JobOptions:
        if not text:
            return cls()
        return cls(**json.loads(text))

    def check(self) -> JobOptions:
        if self.max_retries is not None and (
            isinstance(self.max_retries, bool)
            or not isinstance(self.max_retries, int)
            or self.max_retries < 0
        ):
            raise ValueError(
                f"max_retries is a non-negative integer or None, got {self.max_retries!r}"
            )
        for name in ("default_retry_delay", "retry_backoff", "retry_backoff_max"):
            value = getattr(self, name)
            if isinstance(value, bool):
                value = 1.0 if value else 0.0
                setattr(self, name, value)
            if not isinstance(value, (int, float)) or value < 0 or math.isnan(value):
                raise ValueError(f"{name} is a non-negative number of seconds, got {value!r}")
        if not isinstance(self.max_deliveries, int) or self.max_deliveries < 1:
            raise ValueError(f"max_deliveries is a positive integer, got {self.max_deliveries!r}")
        return self


def exception_path(exc_type: type) -> str:
    if not (isinstance(exc_type, type) and issubclass(exc_type, BaseException)):
        raise TypeError(f"autoretry_for lists exception classes, got {exc_type!r}")
    return f"{exc_type.__module__}.{exc_type.__qualname__}"


def matches(exc: BaseException, paths: list[str]) -> bool:
    """Whether exc is an instance of one of the classes named by paths."""
    for klass in type(exc).__mro__:
        if f"{klass.__module__}.{klass.__qualname__}" in paths:
            return True
    return False


def new_job_id() -> str:
    return str(uuid.uuid4())


@dataclass
class JobSpec:
    """A job to enqueue: what to call, where, when, and how."""

    name: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    queue: str = DEFAULT_QUEUE
    job_id: str = field(default_factory=new_job_id)
    priority: int | None = None
    due_ms: int = 0  # 0: now
    expires_ms: int = 0  # 0: never
    result_ttl: float = DEFAULT_RESULT_TTL
    options: JobOptions = field(default_factory=JobOptions)
    children: list[str] = field(default_factory=list)
    chord: str = ""
    header: list[str] = field(default_factory=list)
    waiting: bool = False

    def fields(self) -> list[Any]:
        """The job hash's fields, as a flat field/value list."""
        if not isinstance(self.args, (tuple, list)):
            raise TypeError(f"a job's args are a tuple or list, got {type(self.args).__name__}")
        if not isinstance(self.kwargs, dict):
            raise TypeError(f"a job's kwargs are a dict, got {type(self.kwargs).__name__}")
        out: list[Any] = [
            "id", self.job_id,
            "queue", self.queue,
            "level", str(level_of(self.priority)),
            "name", self.name,
            "payload", dumps((tuple(self.args), self.kwargs)),
            "opts", self.options.to_json(),
            "result_ttl", str(int(self.result_ttl * 1000)),
            "retries", "0",
        ]  # fmt: skip
        if self.expires_ms:
            out += ["expires", str(self.expires_ms)]
        if self.due_ms:
            out += ["eta", str(self.due_ms)]
        if self.children:
            out += ["children", ",".join(self.children)]
        if self.chord:
            out += ["chord", self.chord]
        if self.header:
            out += ["header", ",".join(self.header)]
        return out


@dataclass
class JobContext:
    """What a running job can learn about itself (``redray.durable.current_job()``)."""

    id: str
    name: str
    queue: str
    retries: int
    deliveries: int
    options: JobOptions
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    consumer: str = ""
    started: float = field(default_factory=time.time)


_local = threading.local()


def current_job() -> JobContext | None:
    """The job this thread is running (None outside a job)."""
    return getattr(_local, "job", None)


def set_current_job(job: JobContext | None) -> None:
    _local.job = job


def resolve(name: str, registry: dict[str, Callable[..., Any]]) -> Callable[..., Any] | None:
    """The function registered under name, else the one its dotted name imports."""
    fn = registry.get(name)
    if fn is None:
        fn = import_by_name(name)
        if fn is not None and not callable(fn):
            fn = None
        fn = getattr(fn, "__wrapped_job__", fn)
    return fn
