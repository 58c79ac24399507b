"""The GCS control loop: cluster decisions that must outlive any one driver.

It runs on every head node but acts only while it holds the leadership lease in Redis
(renewed every TICK_SECONDS), so a standby head takes over when the active one dies. Each
hold of the lease is a tenure with its own fencing epoch (see tenure.py): every write is
fenced, and a leader that finds its tenure over (a refused write, a lost or retaken lease)
drops everything it tracked. The leader detects dead nodes from expired heartbeats, handles
the requests queued for it (create/kill actors, create/remove placement groups; each removed
from the queue only once handled, so a leader dying in between leaves it to its successor),
and runs the actor and placement-group managers (actors.py, placement.py).

All decisions run on one thread, fed by a queue of events, so the state needs no locks;
Redis calls happen on that thread and the request reader's, never on a reactor thread.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Any

from redray import gcs as gcs_schema
from redray.control.actors import ActorManager
from redray.control.placement import PlacementGroupManager
from redray.control.tenure import HostNode, Tenure
from redray.gcs import BadRequest, Fence, Gcs, NotLeaderError, Request
from redray.jobs.scheduler import JobScheduler
from redray.transport.connection import Connection
from redray.watcher import Watcher, is_connection_error
from redray.worker import CoreWorker

log = logging.getLogger(__name__)

LEADER_TTL = float(os.environ.get("REDRAY_LEADER_TTL", "3"))
TICK_SECONDS = 0.5
REQUEST_WAIT_SECONDS = 1.0  # how long the request reader waits for the next request


class ControlLoop:
    """Leader-elected cluster manager living in a head raylet's process."""

    def __init__(self, host: HostNode):
        self.host = host
        self.holder = host.node_id
        self.gcs = Gcs(host.config["gcs_url"], host.config["cluster"])
        self.node_timeout = float(host.config.get("node_timeout", 4.0))
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.tenure = Tenure(self.gcs, host, self.post)
        self.actors = ActorManager(self.tenure)
        self.pgs = PlacementGroupManager(self.tenure, self.actors.kill_in_group)
        self.stopping = threading.Event()
        # Since when Redis has answered without a break: heartbeats missed while it did not
        # (or before this tenure began) prove nothing about a node.
        self._redis_ok_since: float | None = None
        self._redis_down = False

    @property
    def leader(self) -> bool:
        return self.tenure.leading

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True, name="redray-control").start()
        JobScheduler(
            self.host.config["gcs_url"], self.host.config["cluster"], self.tenure, self.stopping
        ).start()

    def stop(self) -> None:
        self.stopping.set()
        self.events.put(None)

    def post(self, fn: Any, *args: Any) -> None:
        """Run fn(*args) on the control thread."""
        self.events.put((fn, args))

    # -- the loop ---------------------------------------------------------------------------
    def _run(self) -> None:
        next_tick = 0.0
        while not self.stopping.is_set():
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + TICK_SECONDS
                self._guarded(self._tick)
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                self._guarded(self._flush)  # nothing else to do now: write what was decided
                try:
                    event = self.events.get(timeout=max(0.0, next_tick - time.monotonic()))
                except queue.Empty:
                    continue
            if event is None:
                break
            fn, args = event
            self._guarded(fn, *args)
        if self.leader:
            self._guarded(self._flush)
            try:
                self.gcs.release_leadership(self.holder)
            except Exception:
                pass

    def _guarded(self, fn: Any, *args: Any) -> None:
        """Run fn on the control thread: a refused write ends the tenure; a Redis outage is
        logged once (not per event) and ridden out."""
        try:
            fn(*args)
        except NotLeaderError:
            self._end_tenure("a write was refused: another head took the lease")
        except Exception as exc:
            if is_connection_error(exc):
                self._redis_ok_since = None
                if not self._redis_down:
                    self._redis_down = True
                    log.warning("Redis is unreachable (%s); the control loop waits for it", exc)
            else:
                log.exception("control loop step %r failed", fn)

    def _flush(self) -> None:
        if self.leader:
            self.pgs.flush()

    def _tick(self) -> None:
        epoch = self.gcs.hold_leadership(self.holder, LEADER_TTL)
        now = time.monotonic()
        if self._redis_down:
            self._redis_down = False
            log.warning("Redis answers again")
        if self._redis_ok_since is None:
            self._redis_ok_since = now
        fence = self.tenure.fence
        if not epoch:
            if fence is not None:
                self._end_tenure("another head holds the lease")
            return
        if fence is None or fence.epoch != epoch:
            if fence is not None and epoch != fence.epoch + 1:
                # Someone else led in between (every taking of the lease counts).
                self._end_tenure("the lease was taken again by another head meanwhile")
            self._begin_tenure(Fence(self.holder, epoch), continued=fence is not None)
        self._check_nodes(now)
        self.actors.kill_overdue_exits()
        self.pgs.retry_pending()

    def _begin_tenure(self, fence: Fence, continued: bool) -> None:
        """This head leads from now on. `continued`: it led until now (the lease was renewed
        late but nobody else held it), so what it tracks is still right."""
        self.tenure.fence = fence
        if continued:
            return
        log.info("this head now runs the control loop (epoch %d)", fence.epoch)
        self._redis_ok_since = time.monotonic()  # every node gets a full timeout to beat
        if self.tenure.client is None:
            self._start_client()
        self.actors.adopt()
        self.pgs.adopt()
        self.post(self._handle_requests, self.gcs.unacked_requests(), fence.epoch)

    def _end_tenure(self, reason: str) -> None:
        if self.tenure.fence is None:
            return
        log.warning("this head no longer runs the control loop: %s", reason)
        self.tenure.fence = None
        self.actors.drop()
        self.pgs.drop()

    def _start_client(self) -> None:
        """The leader's core worker (to lease workers, reach actors and raylets), the
        request reader, and the subscription to process deaths: made once per process."""
        host = self.host
        client = CoreWorker(
            mode="control",
            token=host.token,
            raylet_address=host.address,
            gcs_url=host.config["gcs_url"],
            cluster=host.config["cluster"],
            worker_id=os.urandom(16),
            job_id="",
            namespace="",
            listen_host=host.host,
        )
        client.peers.handle("actor_exiting", self._on_actor_exiting)
        self.tenure.client = client
        threading.Thread(target=self._read_requests, daemon=True, name="requests").start()
        Watcher(
            self.gcs,
            {gcs_schema.WORKER_CHANNEL: lambda e: self.post(self._on_process_died, e["worker_id"])},
            self.stopping.is_set,
        ).ensure_running()

    # -- requests ---------------------------------------------------------------------------
    def _read_requests(self) -> None:
        """Take queued requests for the leader (their own thread: taking waits on Redis)."""
        gcs = Gcs(self.host.config["gcs_url"], self.host.config["cluster"])
        failing = False
        while not self.stopping.is_set():
            fence = self.tenure.fence
            if fence is None:
                self.stopping.wait(TICK_SECONDS)
                continue
            try:
                requests = gcs.take_requests(fence, timeout=REQUEST_WAIT_SECONDS)
                if failing:  # what was taken while the reply was lost is in the taken list
                    requests = gcs.unacked_requests() + requests
                failing = False
            except NotLeaderError:
                self.stopping.wait(TICK_SECONDS)  # (the tick learns it too, and ends the tenure)
                continue
            except Exception as exc:
                if self.stopping.is_set():
                    return
                if not failing:
                    log.warning("reading control requests failed (%s); retrying", exc)
                failing = True
                self.stopping.wait(TICK_SECONDS)
                continue
            if requests:
                self.post(self._handle_requests, requests, fence.epoch)

    def _handle_requests(self, requests: list[Request | BadRequest], epoch: int) -> None:
        """Act on a burst of requests, in order; each is acknowledged once handled (a bad
        or failing one alone, the others go on). Requests of an earlier tenure are left in
        the taken list: the tenure that reads them there handles them."""
        fence = self.tenure.fence
        if fence is None or fence.epoch != epoch:
            return
        for index, request in enumerate(requests):
            if isinstance(request, BadRequest):
                log.warning("dropping a malformed control request: %s", request.error)
            else:
                handler = getattr(self, f"_request_{request.kind}")
                try:
                    handler(*request.args)
                except NotLeaderError:
                    raise
                except Exception as exc:
                    if is_connection_error(exc):  # not handled: try again in a moment
                        self._later(self._handle_requests, requests[index:], epoch)
                        raise
                    log.exception("control request %s failed", request.kind)
            self.gcs.ack_requests(fence, [request])

    def _later(self, fn: Any, *args: Any) -> None:
        """Post fn(*args) to the control thread after a tick."""
        timer = threading.Timer(TICK_SECONDS, self.post, (fn, *args))
        timer.daemon = True
        timer.start()

    def _request_create_actor(self, actor_id: str) -> None:
        self.actors.create(actor_id)

    def _request_kill_actor(self, actor_id: str, no_restart: bool) -> None:
        self.actors.kill_request(actor_id, no_restart)

    def _request_actor_out_of_scope(self, actor_id: str) -> None:
        self.actors.out_of_scope(actor_id)

    def _request_create_pg(self, pg_id: str, info: dict) -> None:
        self.pgs.create(pg_id, info)

    def _request_remove_pg(self, pg_id: str) -> None:
        self.pgs.remove(pg_id)

    # -- events -----------------------------------------------------------------------------
    def _on_process_died(self, worker_id_hex: str) -> None:
        """A driver or worker died: what it owned (unless detached) dies with it."""
        if not self.leader:
            return
        self.pgs.owner_died(worker_id_hex)
        self.actors.process_died(worker_id_hex)

    def _on_actor_exiting(self, conn: Connection, message: tuple) -> None:
        _, actor_id, reason = message
        self.post(self.actors.note_exit, actor_id.hex(), reason)

    # -- nodes ------------------------------------------------------------------------------
    def _check_nodes(self, now: float) -> None:
        """Declare dead the live nodes whose heartbeat expired, once Redis has answered for a
        full node timeout (a beat lost to an outage, or before this tenure, proves nothing).
        Never this loop's own node: it is alive while the loop runs, however late its beat."""
        ok_since = self._redis_ok_since
        if ok_since is None or now - ok_since < self.node_timeout:
            return
        fence = self.tenure.require()
        for node in self.gcs.live_nodes():
            if node["node_id"] == self.host.node_id:
                continue
            if not node["alive"] and self.gcs.mark_node_dead(
                node["node_id"], "missed heartbeats", fence=fence
            ):
                log.warning("node %s is dead (no heartbeat)", node["node_id"])
