"""What the parts of the control loop share: the GCS, the node the loop runs in, the leader's
core worker, its event queue, and the fence of the current tenure.

A tenure is one unbroken hold of the leadership lease, identified by the fencing epoch Redis
handed out when the lease was taken. Every write of the leader carries the fence and is
refused (NotLeaderError, nothing written) once the tenure is over, so a leader that stalled
past its lease and woke up cannot undo what its successor decided. Everything the loop
tracks belongs to one tenure and is dropped with it; the next tenure adopts the tables anew.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from redray.gcs import Fence, Gcs, NotLeaderError
from redray.transport.reactor import Reactor
from redray.worker import CoreWorker


class HostNode(Protocol):
    """The node whose process runs the control loop (a head's raylet), as the loop uses it."""

    node_id: str
    token: bytes
    address: tuple[str, int]
    host: str
    config: dict[str, Any]
    reactor: Reactor

    def reserve_bundles(self, pg_id: str, bundles: list, commit: bool) -> bool: ...
    def commit_bundles(self, pg_id: str) -> None: ...
    def cancel_bundles(self, pg_id: str) -> None: ...
    def remove_bundles(self, pg_id: str) -> None: ...


class Tenure:
    """The control loop's shared context. Read and written on the control thread only
    (`fence` is also read by the request reader: one attribute read)."""

    def __init__(self, gcs: Gcs, host: HostNode, post: Callable[..., None]):
        self.gcs = gcs
        self.host = host
        self.post = post  # run a function on the control thread
        self.fence: Fence | None = None  # set while this head leads
        self.client: CoreWorker | None = None  # the leader's core worker (made once)

    @property
    def leading(self) -> bool:
        return self.fence is not None

    def require(self) -> Fence:
        """The current fence, for a leader write; NotLeaderError when not leading."""
        fence = self.fence
        if fence is None:
            raise NotLeaderError()
        return fence
