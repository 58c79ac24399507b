"""Consumers as actors: each consumer actor runs consumer loops (redray/durable/consumer.py)
on threads of its own, calling the user's functions, or the methods of one instance of the
user's class that lives as long as the actor (a loaded model, a pool of connections).

A consumer actor that dies (SIGKILL, OOM) is restarted as ``max_restarts`` says; the jobs it
held are taken over by the other consumers once its heartbeat lapses.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import redray
from redray.actor import ActorClass, ActorHandle
from redray.durable import jobs as jobmod
from redray.durable.client import QueueClient
from redray.durable.consumer import Consumer, ConsumerSettings
from redray.gcs import Gcs

READY_TIMEOUT_SECONDS = 60.0
STOP_GRACE_SECONDS = 10.0


def find_app(module: Any) -> Any:
    """The app a module holds, found as ``celery -A`` does: its ``app`` or ``celery``
    attribute, else any attribute that is an app, else the same in its ``celery``
    submodule. None when there is none."""
    for name in ("app", "celery"):
        if hasattr(getattr(module, name, None), "durable_handlers"):
            return getattr(module, name)
    for value in vars(module).values():
        if hasattr(value, "durable_handlers") and not isinstance(value, type):
            return value
    if hasattr(module, "__path__"):
        try:
            return find_app(importlib.import_module(module.__name__ + ".celery"))
        except ImportError:
            return None
    return None


def load_target(target: Any) -> Any:
    """A "module" or "module:attribute" string names the target in the consumer's process
    (an app found in the module, or the attribute: an app, a function, a class); anything
    else is the target itself."""
    if not isinstance(target, str):
        return target
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    if not attr:
        app = find_app(module)
        if app is None:
            raise LookupError(f"no app (an object with durable_handlers) in module {module_name!r}")
        return app
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def handlers_for(
    target: Any, init_args: tuple, init_kwargs: dict
) -> tuple[Callable[[str], Any], Callable[..., Any] | None]:
    """(find a job's function by name, the wrapper that runs it) for a target: an object
    with ``durable_handlers()`` (a Celery-style app), a class (one instance per consumer
    actor; jobs name its methods), a function, or a list/dict of functions."""
    if hasattr(target, "durable_handlers"):
        return target.durable_handlers()
    if isinstance(target, ActorClass):
        target = target._cls
    if isinstance(target, type):
        instance = target(*init_args, **init_kwargs)
        prefix = jobmod.function_name(target) + "."

        def method(name: str) -> Any:
            attr = name[len(prefix) :] if name.startswith(prefix) else name
            if attr.startswith("_"):
                return None
            found = getattr(instance, attr, None)
            return found if callable(found) else None

        return method, None
    if isinstance(target, dict):
        registry = dict(target)
    elif callable(target):
        registry = {jobmod.function_name(target): target}
    elif isinstance(target, (list, tuple)):
        registry = {jobmod.function_name(fn): fn for fn in target}
    else:
        raise TypeError(
            "consume() takes a function, a list or dict of functions, a class or an app, "
            f"got {type(target).__name__}"
        )
    return (lambda name: jobmod.resolve(name, registry)), None


class ConsumerActor:
    """One consumer process: ``concurrency`` consumer loops per queue, on threads."""

    def __init__(
        self,
        address: str,
        cluster: str,
        queues: list[str],
        target: Any,
        settings: dict[str, Any],
        concurrency: int,
        init_args: tuple = (),
        init_kwargs: dict | None = None,
        sys_path: list[str] | None = None,
    ):
        for path in reversed(sys_path or []):
            if path not in sys.path:
                sys.path.insert(0, path)
        self.client = QueueClient(Gcs(address, cluster))
        lookup, wrap = handlers_for(load_target(target), init_args, init_kwargs or {})
        consumer_settings = ConsumerSettings(**settings)
        self.consumers = [
            Consumer(self.client, queue, lookup, consumer_settings, wrap=wrap)
            for queue in queues
            for _ in range(concurrency)
        ]
        self.threads = [
            threading.Thread(target=c.run, name=f"redray-dq-{c.queue}", daemon=True)
            for c in self.consumers
        ]
        for thread in self.threads:
            thread.start()

    def ready(self) -> int:
        return os.getpid()

    def stats(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "ran": sum(c.ran for c in self.consumers),
            "consumers": [c.name for c in self.consumers],
        }

    def stop(self, timeout: float = STOP_GRACE_SECONDS) -> bool:
        """Stop taking jobs, let running ones finish (up to timeout), hand back the rest."""
        for consumer in self.consumers:
            consumer.stop()
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self.threads)


class Consumers:
    """The consumer actors ``consume()`` started."""

    def __init__(self, actors: list[ActorHandle]):
        self.actors = actors

    def pids(self) -> list[int]:
        return redray.get([a.ready.remote() for a in self.actors], timeout=READY_TIMEOUT_SECONDS)

    def stats(self) -> list[dict[str, Any]]:
        return redray.get([a.stats.remote() for a in self.actors], timeout=READY_TIMEOUT_SECONDS)

    def stop(self, timeout: float = STOP_GRACE_SECONDS) -> None:
        """Stop every consumer gracefully (jobs not started go back to the queue), then end
        the actors."""
        refs = [a.stop.remote(timeout) for a in self.actors]
        try:
            redray.get(refs, timeout=timeout + 5)
        except Exception:
            pass
        for actor in self.actors:
            try:
                redray.kill(actor, no_restart=True)
            except Exception:
                pass


_remote_consumer = redray.remote(ConsumerActor)


def consume(
    address: str,
    cluster: str,
    queues: list[str],
    target: Any,
    settings: ConsumerSettings,
    num_consumers: int = 1,
    concurrency: int = 1,
    resources: dict[str, float] | None = None,
    num_cpus: float | None = None,
    max_restarts: int = -1,
    init_args: tuple = (),
    init_kwargs: dict | None = None,
    wait_ready: bool = True,
    sys_path: list[str] | None = None,
) -> Consumers:
    """Start num_consumers consumer actors on the cluster (any node that fits)."""
    if not isinstance(num_consumers, int) or num_consumers < 1:
        raise ValueError(f"num_consumers is a positive integer, got {num_consumers!r}")
    if not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency is a positive integer, got {concurrency!r}")
    settings.check()
    options: dict[str, Any] = {"max_restarts": max_restarts, "max_concurrency": 4}
    if resources:
        options["resources"] = resources
    if num_cpus is not None:
        options["num_cpus"] = num_cpus
    actors = [
        _remote_consumer.options(**options).remote(
            address,
            cluster,
            list(queues),
            target,
            asdict(settings),
            concurrency,
            tuple(init_args),
            init_kwargs or {},
            list(sys_path or []),
        )
        for _ in range(num_consumers)
    ]
    consumers = Consumers(actors)
    if wait_ready:
        consumers.pids()
    return consumers
