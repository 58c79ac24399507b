"""``redray.durable.Queue``: a named durable queue of one cluster, and ``Job``, the handle of
one job in it."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Iterable
from typing import Any

from redray.actor import ActorClass
from redray.durable import jobs as jobmod
from redray.durable import keys as K
from redray.durable.actors import Consumers, consume
from redray.durable.client import QueueClient, check_queue_name, connect, now_ms
from redray.durable.consumer import ConsumerSettings
from redray.durable.jobs import JobOptions, JobSpec

_UNSET: Any = object()


class Job:
    """A job's handle: its id and, read from Redis on each access, its state and result."""

    def __init__(self, client: QueueClient, job_id: str):
        self.client = client
        self.id = job_id

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    @property
    def state(self) -> str:
        return self.client.state(self.id)

    def info(self) -> dict[str, Any]:
        return self.client.info(self.id)

    def ready(self) -> bool:
        return self.state in K.READY_STATES

    def successful(self) -> bool:
        return self.state == K.SUCCESS

    def get(self, timeout: float | None = None, propagate: bool = True) -> Any:
        """The result once the job is done; its exception if it failed (JobRevokedError if
        revoked); JobTimeoutError after timeout seconds."""
        return self.client.get(self.id, timeout, propagate)

    def revoke(self) -> bool:
        return self.client.revoke(self.id)


class Queue:
    """A durable queue: jobs are kept in the cluster's Redis until a consumer has run them
    and stored their outcome.

    ``address``: the cluster's Redis URL (or "auto"); default: the cluster this process is
    connected to (``redray.init``). Consumer settings (``prefetch``, ``heartbeat_ttl``,
    ``rate_limit`` for the whole queue) apply to consumers started with ``consume``."""

    def __init__(
        self,
        name: str = jobmod.DEFAULT_QUEUE,
        address: str | None = None,
        cluster: str | None = None,
        *,
        rate_limit: str | float | None = None,
        prefetch: int = 4,
        heartbeat_ttl: float = 10.0,
        block_seconds: float = 0.1,
        result_ttl: float = jobmod.DEFAULT_RESULT_TTL,
    ):
        check_queue_name(name)
        self.name = name
        self.client = QueueClient(connect(address, cluster))
        self.result_ttl = result_ttl
        self.settings = ConsumerSettings(
            prefetch=prefetch,
            heartbeat_ttl=heartbeat_ttl,
            block_seconds=block_seconds,
            queue_rate_limit=jobmod.parse_rate(rate_limit),
        ).check()

    def __repr__(self) -> str:
        return f"Queue({self.name!r})"

    # -- enqueueing -------------------------------------------------------------------------
    def spec(
        self,
        fn: Callable[..., Any] | str,
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        job_id: str | None = None,
        countdown: float | None = None,
        eta: float | _dt.datetime | None = None,
        expires: float | _dt.datetime | None = None,
        priority: int | None = None,
        result_ttl: float | None = None,
        max_retries: int | None = _UNSET,
        default_retry_delay: float | None = None,
        retry_backoff: float | bool = False,
        retry_backoff_max: float | None = None,
        retry_jitter: bool = True,
        autoretry_for: Iterable[type] = (),
        rate_limit: str | float | None = None,
        max_deliveries: int | None = None,
    ) -> JobSpec:
        """A job to enqueue (checked here: bad options raise at the call site).

        countdown: seconds from now; eta: a time (epoch seconds or datetime); expires:
        seconds from now (a number below 10**9) or a time, after which the job is revoked
        unrun; priority 0 (first) to 9."""
        if countdown is not None and eta is not None:
            raise ValueError("give countdown or eta, not both")
        now = now_ms()
        due = 0
        if countdown is not None:
            if isinstance(countdown, bool) or not isinstance(countdown, (int, float)):
                raise TypeError(f"countdown is a number of seconds, got {countdown!r}")
            due = now + int(countdown * 1000)
        elif eta is not None:
            due = jobmod.to_ms(eta)
        expires_ms = 0
        if expires is not None:
            if (
                isinstance(expires, (int, float))
                and not isinstance(expires, bool)
                and expires < 1e9
            ):
                expires_ms = now + int(expires * 1000)
            else:
                expires_ms = jobmod.to_ms(expires)
        options = JobOptions(
            max_retries=jobmod.DEFAULT_MAX_RETRIES if max_retries is _UNSET else max_retries,
            default_retry_delay=(
                jobmod.DEFAULT_RETRY_DELAY if default_retry_delay is None else default_retry_delay
            ),
            retry_backoff=float(retry_backoff),
            retry_backoff_max=(
                jobmod.DEFAULT_BACKOFF_MAX if retry_backoff_max is None else retry_backoff_max
            ),
            retry_jitter=bool(retry_jitter),
            autoretry_for=[jobmod.exception_path(t) for t in autoretry_for],
            rate_limit=jobmod.parse_rate(rate_limit),
            max_deliveries=max_deliveries or jobmod.DEFAULT_MAX_DELIVERIES,
        ).check()
        return JobSpec(
            name=jobmod.function_name(fn),
            args=tuple(args),
            kwargs=dict(kwargs or {}),
            queue=self.name,
            job_id=job_id or jobmod.new_job_id(),
            priority=priority,
            due_ms=due,
            expires_ms=expires_ms,
            result_ttl=self.result_ttl if result_ttl is None else result_ttl,
            options=options,
        )

    def send(
        self,
        fn: Callable[..., Any] | str,
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> Job:
        """Enqueue fn(*args, **kwargs) with options (see ``spec``). A job_id that exists
        already enqueues nothing: the handle is the existing job's."""
        spec = self.spec(fn, args, kwargs, **options)
        self.client.enqueue(spec)
        return Job(self.client, spec.job_id)

    def enqueue(self, fn: Callable[..., Any] | str, *args: Any, **kwargs: Any) -> Job:
        """Enqueue fn(*args, **kwargs) with the default options."""
        return self.send(fn, args, kwargs)

    def enqueue_many(self, specs: list[JobSpec]) -> list[Job]:
        """Enqueue many jobs (made with ``spec``), hundreds per round trip."""
        self.client.enqueue_many(specs)
        return [Job(self.client, spec.job_id) for spec in specs]

    def job(self, job_id: str) -> Job:
        return Job(self.client, job_id)

    # -- consumers -----------------------------------------------------------------------------
    def consume(
        self,
        target: Any,
        num_consumers: int = 1,
        *,
        concurrency: int = 1,
        resources: dict[str, float] | None = None,
        num_cpus: float | None = None,
        max_restarts: int = -1,
        init_args: Iterable[Any] = (),
        init_kwargs: dict[str, Any] | None = None,
        queues: Iterable[str] | None = None,
    ) -> Consumers:
        """Start num_consumers consumer actors on the cluster that take this queue's jobs
        (and those of ``queues``) and run them: target is a function, a list or dict of
        functions, a class (one instance per actor, made with init_args; jobs name its
        methods), or a "module:attr" string imported by the consumers."""
        if isinstance(target, ActorClass):
            target = target._cls
        names = [self.name, *(q for q in (queues or ()) if q != self.name)]
        for name in names:
            check_queue_name(name)
        return consume(
            self.client.gcs.url,
            self.client.gcs.cluster,
            names,
            target,
            self.settings,
            num_consumers=num_consumers,
            concurrency=concurrency,
            resources=resources,
            num_cpus=num_cpus,
            max_restarts=max_restarts,
            init_args=tuple(init_args),
            init_kwargs=init_kwargs,
        )

    # -- inspection ----------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        return self.client.stats(self.name)

    def consumers(self) -> dict[str, dict[str, Any]]:
        return self.client.consumers(self.name)

    def dead_letters(self, count: int = 100) -> list[dict[str, str]]:
        return self.client.dead_letters(self.name, count)

    def redrive(self, count: int = 1000) -> int:
        return self.client.redrive(self.name, count)

    def purge(self) -> int:
        return self.client.purge(self.name)

    def close(self) -> None:
        """Close this handle's connections to Redis (consumers it started run on)."""
        self.client.gcs.close()
