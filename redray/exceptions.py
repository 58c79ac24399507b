"""The errors redray raises, with Ray's class names so `except ray.exceptions.X` keeps working.

A task's own exception reaches the caller as a `RayTaskError` that is *also* an instance of the
user's exception class (see `RayTaskError.as_instanceof_cause`), so both
`except RayTaskError` and `except ValueError` catch a remote `ValueError`.
"""

from __future__ import annotations

import os
import socket


class RayError(Exception):
    """Base class of every redray error."""


class RaySystemError(RayError):
    """An internal failure of the runtime, not of user code."""

    def __init__(self, client_exc: object = None, traceback_str: str | None = None):
        self.client_exc = client_exc
        self.traceback_str = traceback_str
        super().__init__(client_exc)

    def __str__(self) -> str:
        text = f"System error: {self.client_exc}"
        return f"{text}\ntraceback: {self.traceback_str}" if self.traceback_str else text


class GcsUnavailableError(RaySystemError):
    """Redis, the cluster's control store, stayed unreachable for longer than this process
    waits for it (``REDRAY_REDIS_OUTAGE_SECONDS``): the call needed it (creating an actor,
    looking up a named actor, exporting a function...). Ray raises RaySystemError when its
    GCS cannot be reached; this is one."""


class RayTaskError(RayError):
    """A task or actor method raised; carries the remote traceback and the original cause."""

    def __init__(
        self,
        function_name: str,
        traceback_str: str,
        cause: BaseException | None,
        proctitle: str | None = None,
        pid: int | None = None,
        ip: str | None = None,
    ):
        self.function_name = function_name
        self.traceback_str = traceback_str
        self.cause = cause
        self.proctitle = proctitle or f"ray::{function_name}"
        self.pid = pid if pid is not None else os.getpid()
        self.ip = ip or _local_ip()
        RayError.__init__(self, self._message())

    def _message(self) -> str:
        lines = self.traceback_str.rstrip("\n").splitlines()
        header = f"{self.proctitle} (pid={self.pid}, ip={self.ip})"
        # Drop the "Traceback (most recent call last):" line as Ray does, keep the frames.
        if lines and lines[0].startswith("Traceback"):
            lines = lines[1:]
        return "\n".join([header, *lines])

    def __str__(self) -> str:
        return self._message()

    def __reduce__(self):
        return (
            _rebuild_task_error,
            (
                self.function_name,
                self.traceback_str,
                self.cause,
                self.proctitle,
                self.pid,
                self.ip,
            ),
        )

    def as_instanceof_cause(self) -> RayTaskError:
        """This error as an instance of both `RayTaskError` and the cause's class."""
        cause_cls = type(self.cause) if self.cause is not None else None
        if cause_cls is None or issubclass(RayTaskError, cause_cls):
            return self
        if isinstance(self, cause_cls):
            return self
        try:
            cls = _dual_class(cause_cls)
            err = cls.__new__(cls)
            err.__dict__.update(getattr(self.cause, "__dict__", {}))
            RayTaskError.__init__(
                err,
                self.function_name,
                self.traceback_str,
                self.cause,
                self.proctitle,
                self.pid,
                self.ip,
            )
            err.args = (self._message(),)
            return err
        except TypeError:
            return self


_dual_classes: dict[type, type] = {}


def _dual_class(cause_cls: type) -> type:
    cls = _dual_classes.get(cause_cls)
    if cls is None:

        def __getattr__(self, name):
            return getattr(self.cause, name)

        cls = type(
            f"RayTaskError({cause_cls.__name__})",
            (RayTaskError, cause_cls),
            {"__getattr__": __getattr__, "__str__": RayTaskError.__str__},
        )
        _dual_classes[cause_cls] = cls
    return cls


def _rebuild_task_error(function_name, traceback_str, cause, proctitle, pid, ip) -> RayTaskError:
    return RayTaskError(
        function_name, traceback_str, cause, proctitle, pid, ip
    ).as_instanceof_cause()


def _local_ip() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


class GetTimeoutError(RayError, TimeoutError):
    """`get` or `wait` ran out of time before the objects were ready."""


class WorkerCrashedError(RayError):
    """The worker executing the task died unexpectedly (and retries, if any, are spent)."""

    def __init__(self, message: str | None = None):
        super().__init__(
            message
            or "The worker died unexpectedly while executing this task. Check the node's "
            "logs for the cause (e.g. the process was killed or ran out of memory)."
        )


class TaskCancelledError(RayError):
    """The task was cancelled with `cancel()`."""

    def __init__(self, task_id: object = None, error_message: str | None = None):
        self.task_id = task_id
        self.error_message = error_message
        super().__init__(error_message or f"Task {task_id} was cancelled.")

    def __reduce__(self):
        return (TaskCancelledError, (self.task_id, self.error_message))


class RayActorError(RayError):
    """An actor could not run the method because the actor is dead or unreachable."""

    def __init__(self, cause: object = None, actor_id: str | None = None):
        self.actor_id = actor_id
        self.error_msg = str(cause) if cause is not None else "The actor died unexpectedly."
        super().__init__(self.error_msg)

    def __reduce__(self):
        return (type(self), (self.error_msg, self.actor_id))


class ActorDiedError(RayActorError):
    """The actor is dead and will not be restarted."""


class ActorUnavailableError(RayActorError):
    """The actor is temporarily unreachable (restarting); the call may or may not have run."""


class ActorUnschedulableError(RayError):
    """The actor can never be scheduled (for example its placement group was removed)."""


class TaskUnschedulableError(RayError):
    """The task can never be scheduled (for example its placement group was removed)."""


class ObjectLostError(RayError):
    """The object's value is gone from every node and cannot be rebuilt."""

    def __init__(self, object_ref_hex: str = "", owner_address: object = None, call_site: str = ""):
        self.object_ref_hex = object_ref_hex
        self.owner_address = owner_address
        self.call_site = call_site
        super().__init__(self._message())

    def _message(self) -> str:
        return (
            f"Failed to retrieve object {self.object_ref_hex}. All copies of it are lost "
            "and it cannot be reconstructed."
        )

    def __reduce__(self):
        return (type(self), (self.object_ref_hex, self.owner_address, self.call_site))


class OwnerDiedError(ObjectLostError):
    """The process that owned the object (created the ref) died, so the object is lost."""

    def _message(self) -> str:
        return (
            f"Failed to retrieve object {self.object_ref_hex}: its owner "
            f"{self.owner_address} has died, and every object it owned is lost."
        )


class ObjectReconstructionFailedError(ObjectLostError):
    """The object was lost and re-running the task that made it failed or was not possible."""


class ObjectFetchTimedOutError(ObjectLostError):
    """Fetching the object from a remote node timed out."""


class ReferenceCountingAssertionError(ObjectLostError):
    """The object was freed while a reference to it still existed (a redray bug)."""


class ObjectStoreFullError(RayError, MemoryError):
    """The shared-memory store cannot hold the object: what is pinned leaves no room."""


class OutOfMemoryError(RayError):
    """The task was killed because the node ran out of memory."""


class NodeDiedError(RayError):
    """The node the task or object lived on died."""


class LocalRayletDiedError(RayError):
    """The raylet of this process's node died."""


class RuntimeEnvSetupError(RayError):
    """The task's runtime_env could not be set up (the message says why: for a failed
    install, the installer's last lines)."""

    def __init__(self, error_message: str | None = None):
        super().__init__(error_message)
        self.error_message = error_message

    def __str__(self) -> str:
        return "\n".join(
            filter(None, ["Failed to set up runtime environment.", self.error_message])
        )


class PendingCallsLimitExceeded(RayError):
    """An actor's `max_pending_calls` was reached."""


class PlacementGroupSchedulingError(RayError):
    """A placement group could not be created."""


class AsyncioActorExit(RayError):
    """Raised inside an async actor to exit it (`exit_actor`)."""


class ObjectRefStreamEndOfStreamError(RayError):
    """A generator's stream has no item at that position: the generator ended before it."""


class StreamingGeneratorReplayInconsistentError(RaySystemError):
    """A generator task run again after a failure yielded fewer items than its caller had
    already received: its output is not deterministic, so the stream fails instead of
    waiting for items that will never come."""


# Redray-style names for the same classes.
TaskError = RayTaskError
ActorError = RayActorError

__all__ = [
    "ActorDiedError",
    "ActorError",
    "ActorUnavailableError",
    "ActorUnschedulableError",
    "AsyncioActorExit",
    "GcsUnavailableError",
    "GetTimeoutError",
    "LocalRayletDiedError",
    "NodeDiedError",
    "ObjectFetchTimedOutError",
    "ObjectLostError",
    "ObjectReconstructionFailedError",
    "ObjectRefStreamEndOfStreamError",
    "ObjectStoreFullError",
    "OutOfMemoryError",
    "OwnerDiedError",
    "PendingCallsLimitExceeded",
    "PlacementGroupSchedulingError",
    "RayActorError",
    "RayError",
    "RaySystemError",
    "RayTaskError",
    "ReferenceCountingAssertionError",
    "RuntimeEnvSetupError",
    "StreamingGeneratorReplayInconsistentError",
    "TaskCancelledError",
    "TaskError",
    "TaskUnschedulableError",
    "WorkerCrashedError",
]
