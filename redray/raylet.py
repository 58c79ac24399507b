"""The raylet: one per node. Resources, the worker pool, leases, and the object store.

Owners ask it for a lease on a worker for a scheduling shape; it grants one when the shape's
resources are free here, answers "try node X" (spillback) when another node fits better, or
keeps the request pending (warning when no node could ever fit it). A worker blocked in
`get` lends its CPU back so nested tasks cannot deadlock. It also owns the node's
shared-memory store and reports its state to the GCS with heartbeats.

Run as a process: ``python -m redray.raylet`` reading its JSON configuration on stdin.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

from redray import exceptions
from redray import gcs as gcs_schema
from redray.control.loop import ControlLoop
from redray.gcs import Gcs, HeartbeatStatus, LiveNodes, NodeDeadError
from redray.jobs.supervisor import JobSupervisor
from redray.node import scheduling, worker_pool
from redray.node.bundles import Bundles
from redray.node.object_manager import ObjectManager
from redray.node.redis_server import RedisServer
from redray.objstore import files
from redray.objstore.arena import SharedArena
from redray.objstore.store import ObjectStore
from redray.outage import OUTAGE_ENV, health, outage_limit
from redray.resources import placement_group_of
from redray.runtime_env import packaging
from redray.runtime_env import spec as env_spec
from redray.runtime_env.node import NodeEnvs, Prepared
from redray.state.events import TaskEventSink
from redray.state.node_service import NodeStateService
from redray.transport.connection import Connection
from redray.transport.reactor import Reactor
from redray.watcher import Watcher, is_connection_error

log = logging.getLogger("redray.raylet")

HEARTBEAT_SECONDS = 0.5
HEARTBEAT_BACKOFF_MAX_SECONDS = 1.0  # between beats while Redis is away (well below the timeout)
SNAPSHOT_WAIT_SECONDS = 0.2  # how long a beat waits for the reactor's fresh snapshot
IDLE_WORKER_SECONDS = 10.0
UNKNOWN_NODE_SECONDS = 3.0  # how long a request may name a node nobody has heard of
INFEASIBLE_WARNING_SECONDS = 1.0  # a new node (or placement group) may make it fit meanwhile
MAX_ENVS = 10_000  # distinct runtime envs a node remembers (beyond: no inheritance info)
ENV_MARK = "\0runtime_env"  # the entry of a worker-pool key naming a runtime env to set up


@dataclass
class _Worker:
    worker_id: bytes
    env_key: tuple
    pid: int = 0
    conn: Connection | None = None
    address: tuple | None = None
    lease: _Lease | None = None
    ready: bool = False
    idle_since: float = 0.0
    dead: bool = False
    gpu: bool | None = None  # ran GPU work (True) or CPU-only work (False); None: neither yet
    retiring: bool = False  # reached a function's max_calls: ended once its lease ends
    launched: float = field(default_factory=time.time)


@dataclass
class _Lease:
    lease_id: int
    worker: _Worker
    resources: dict[str, float]
    holder: Connection
    gpu_ids: list[int] = field(default_factory=list)
    lent_cpu: float = 0.0
    reclaim_sent: bool = False
    actor: bool = False  # a dedicated actor worker: outlives its holder's connection


@dataclass
class _Request:
    conn: Connection
    call_id: int
    resources: dict[str, float]
    env_vars: dict[str, str]
    env_key: tuple
    name: str
    actor: bool = False
    capture: bool = False
    strategy: Any = None
    spilled: bool = False
    since: float = 0.0
    warned: bool = False
    gpu: bool = False  # needs GPUs: runs only on workers that never ran CPU-only work
    undecided: bool = False  # names a node not known yet: decide again as the view updates


class Raylet:
    """The node manager of one node."""

    def __init__(self, config: dict[str, Any], zygote: tuple[int, socket.socket]):
        self.config = config
        self.node_id: str = config["node_id"]
        self.token: bytes = bytes.fromhex(config["token"])
        self.host: str = config["node_ip_address"]
        self.total = scheduling.normalize(config["resources"])
        self.available = dict(self.total)
        self.gpu_free = list(range(int(self.total.get("GPU", 0))))
        self.workers: dict[bytes, _Worker] = {}
        self.by_pid: dict[int, _Worker] = {}
        self.idle: dict[tuple, list[_Worker]] = {}
        self.starting: Counter = Counter()
        self.leases: dict[int, _Lease] = {}
        self.pending: list[_Request] = []
        self.clients: dict[Connection, bytes] = {}
        self.bundles = Bundles(self.total, self.available)
        self.lease_ids = itertools.count(1)
        self.cluster_view: list[scheduling.NodeView] = []
        self.stopping = threading.Event()
        self.zygote_pid, zygote_sock = zygote
        self.redis_server = None
        self.control = None
        self.jobs: JobSupervisor | None = None
        self.outage_limit = outage_limit()  # how long a Redis outage is ridden out
        health.consequence = (
            "This node keeps running its tasks and beats again with backoff; it stops if "
            f"Redis stays away {self.outage_limit:g} s ({OUTAGE_ENV})."
        )
        self.exit_code = 0
        self._registration: dict[str, Any] = {}  # what the node registered (to register again)
        self._gcs_jobs: queue.SimpleQueue = queue.SimpleQueue()

        capacity = int(config["object_store_memory"])
        self.arena = SharedArena.create(capacity)
        self.store = ObjectStore(self.arena, capacity, config["spill_dir"])
        self.creating: dict[bytes, set[bytes]] = {}
        self.leader_epoch = 0  # the newest control-loop epoch seen (see _stale_leader)
        # Readers of objects still being written: told (True) once sealed, (False) if not.
        self._seal_waiters: dict[bytes, list[Callable[[bool], None]]] = {}

        self.gcs = Gcs(config["gcs_url"], config["cluster"])
        self.envs = NodeEnvs(self.gcs, os.path.join(config["session_dir"], "runtime_resources"))
        # Worker-pool keys of runtime envs needing setup: their resolved env, and once set
        # up, how their workers start (reactor thread only).
        self.env_of: dict[tuple, dict] = {}
        self.prepared: dict[tuple, Prepared] = {}
        self.preparing: set[tuple] = set()
        self.task_events = TaskEventSink(self.gcs, self.node_id, self.stopping)
        self.state_service = NodeStateService(self)
        self.reactor = Reactor(self.token, name="redray-raylet")
        self.zygote = self.reactor.adopt(zygote_sock, self._on_zygote, self._on_zygote_lost)
        self.address = self.reactor.listen(
            self.host, int(config.get("port", 0)), self._on_message, self._on_conn_closed
        )
        self.object_manager = ObjectManager(
            self.token,
            self.host,
            self.reactor,
            self.store,
            self.arena,
            self.release_pin,
            self.when_sealed,
        )
        self.object_managers: dict[str, tuple[str, int]] = {}  # node id -> its object server
        self._handlers = {
            "register": self._on_register,
            "ready": self._on_ready,
            "lease": self._on_lease,
            "lease_return": self._on_lease_return,
            "lease_resize": self._on_lease_resize,
            "blocked": self._on_blocked,
            "unblocked": self._on_unblocked,
            "retiring": self._on_retiring,
            "alloc": self._on_alloc,
            "seal": self._on_seal,
            "pin": self._on_pin,
            "unpin": self._on_unpin,
            "free": self._on_free,
            "kill_worker": self._on_kill_worker,
            "store_stats": self._on_store_stats,
            "pg_reserve": self._on_pg_reserve,
            "pg_commit": lambda conn, message: self.commit_bundles(message[1]),
            "pg_cancel": lambda conn, message: self.cancel_bundles(message[1]),
            "pg_remove": lambda conn, message: self.remove_bundles(message[1]),
            "debug_state": self._on_debug_state,
            "resources": self._on_resources,
            "shutdown": lambda conn, message: self.reactor.call_soon(self.stop),
            "hello_client": lambda conn, message: None,
            "task_events": self._on_task_events,
            **self.state_service.handlers,
        }

    # -- start / stop -----------------------------------------------------------------------
    def start(self) -> dict[str, Any]:
        info = {
            "raylet_address": list(self.address),
            "object_manager_address": list(self.object_manager.address),
            "node_ip_address": self.host,
            "resources": self.total,
            "is_head": bool(self.config.get("head")),
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "object_store_memory": self.store.capacity,
            "session_dir": self.config["session_dir"],
            "available": self.available,
        }
        if self.redis_server is not None:
            self.redis_server.wait_ready()
        if self.config.get("head"):
            in_force = self.gcs.init_cluster(self.token, {"created_by": self.node_id})
            if in_force != self.token:
                raise RuntimeError(
                    f"cluster {self.config['cluster']!r} in this Redis has another token"
                )
        info["start_time"] = time.time()
        self._registration = {**info, "available": dict(self.available)}
        self.gcs.register_node(self.node_id, info, ttl=self.config["node_timeout"])
        for _ in range(int(self.config.get("prestart_workers", self.total.get("CPU", 0)))):
            self._start_worker(())
        threading.Thread(target=self._heartbeat_loop, daemon=True, name="heartbeat").start()
        threading.Thread(target=self._gcs_writer, daemon=True, name="gcs-writer").start()
        self.task_events.start()
        Watcher(
            self.gcs, {gcs_schema.WORKER_CHANNEL: self._on_death_event}, self.stopping.is_set
        ).start()
        if self.config.get("head"):
            self.control = ControlLoop(self)
            self.control.start()
        self.jobs = JobSupervisor(
            self.node_id,
            self.config["gcs_url"],
            self.config["cluster"],
            self.envs,
            lambda resources: self.reactor.call_soon(self._hold, resources),
            lambda resources: self.reactor.call_soon(self._release, resources),
        )
        self.jobs.start()
        self.reactor.call_later(IDLE_WORKER_SECONDS, self._reap_idle_workers)
        return {"node_id": self.node_id, "gcs_url": self.config["gcs_url"], **info}

    def stop(self, mark_dead: bool = True) -> None:
        """Kill the workers, free the store, leave the cluster (recording the node dead in
        the GCS unless mark_dead is False: it is already, or Redis is out of reach)."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        if self.control is not None:
            self.control.stop()
        if self.jobs is not None:
            self.jobs.stop()
        self._gcs_jobs.put(None)
        pids = [w.pid for w in self.workers.values() if w.pid]
        _kill(self.zygote_pid)
        for pid in pids:
            _kill(pid)
        deadline = time.monotonic() + 5
        for pid in [self.zygote_pid, *pids]:
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.005)
        if mark_dead:
            try:
                self.gcs.mark_node_dead(self.node_id, "node stopped")
            except Exception:
                pass
        self.object_manager.close()
        self.store.close()
        self.arena.close()
        if self.redis_server is not None:
            self.redis_server.stop()
        self.reactor.stop()

    # -- messages ---------------------------------------------------------------------------
    def _on_message(self, conn: Connection, message: tuple) -> None:
        handler = self._handlers.get(message[0])
        if handler is None:
            log.warning("unknown message %r", message[0])
            return
        handler(conn, message)

    def _on_register(self, conn: Connection, message: tuple) -> None:
        _, call_id, mode, worker_id, pid, address, job_id = message
        self.clients[conn] = worker_id
        conn.info.update(mode=mode, worker_id=worker_id, pins=Counter(), pid=pid)
        if mode == "worker":
            worker = self.workers.get(worker_id)
            if worker is None:
                conn.send(("exit",))
                return
            worker.conn, worker.address, worker.pid = conn, tuple(address), pid
            self.by_pid[pid] = worker
        conn.send(("reply", call_id, self.node_info()))

    def node_info(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "store": list(self.arena.descriptor()),
            "node_ip_address": self.host,
            "raylet_address": list(self.address),
            "resources": self.total,
            "session_dir": self.config["session_dir"],
        }

    def _on_ready(self, conn: Connection, message: tuple) -> None:
        worker = self.workers.get(conn.info.get("worker_id"))
        if worker is None:
            return
        worker.ready = True
        self.starting[worker.env_key] -= 1
        self._make_idle(worker)
        self._schedule()

    def _on_conn_closed(self, conn: Connection) -> None:
        client_id = self.clients.pop(conn, None)
        for oid, count in conn.info.get("pins", {}).items():
            for _ in range(count):
                self.release_pin(oid)
        for oid in self.creating.pop(client_id, ()):
            self.store.abort(oid)
            self._sealed(oid, False)
        self.pending = [r for r in self.pending if r.conn is not conn]
        for lease in [lease for lease in self.leases.values() if lease.holder is conn]:
            if lease.actor:
                continue  # actors outlive the control loop that placed them
            # The owner is gone: its workers may be running its tasks; they go too.
            self._end_lease(lease)
            self._kill_worker(lease.worker)
        if client_id is not None and client_id not in self.workers:
            self._announce_death(client_id)  # a driver (pool workers: in _worker_died)
        if client_id is not None:
            self.store.delete_owned_by(client_id)
            worker = self.workers.get(client_id)
            if worker is not None:
                self._worker_died(worker)
        self._schedule()

    # -- worker pool ------------------------------------------------------------------------
    def _start_worker(self, env_key: tuple) -> None:
        worker_id = os.urandom(16)
        self.workers[worker_id] = _Worker(worker_id, env_key)
        self.starting[env_key] += 1
        env_vars = dict(env_key)
        env_vars.pop(ENV_MARK, None)
        if env_key in self.env_of:  # what the worker's own tasks inherit
            env_vars[packaging.WORKER_ENV_VAR] = json.dumps(self.env_of[env_key])
        prepared = self.prepared.get(env_key)
        self.zygote.send(("spawn", worker_id, env_vars, self.address, prepared))

    def _on_zygote(self, conn: Connection, message: tuple) -> None:
        if message[0] == "spawned":
            _, worker_id, pid = message
            worker = self.workers.get(worker_id)
            if worker is not None:
                worker.pid = pid
                self.by_pid[pid] = worker
        elif message[0] == "exited":
            worker = self.by_pid.pop(message[1], None)
            if worker is not None:
                self._worker_died(worker)
                self._schedule()

    def _on_zygote_lost(self, conn: Connection) -> None:
        if not self.stopping.is_set():
            log.error("the worker fork server died; stopping the node")
            self.reactor.call_soon(self.stop)

    def _announce_death(self, process_id: bytes) -> None:
        """Tell the cluster a process died: its owners, borrowers and actors react."""
        self.publish_later(
            lambda: self.gcs.publish(
                gcs_schema.WORKER_CHANNEL,
                {"worker_id": process_id.hex(), "node_id": self.node_id},
            )
        )

    def _worker_died(self, worker: _Worker) -> None:
        if worker.dead:
            return
        worker.dead = True
        self.state_service.worker_died(worker)
        # Also when its sockets outlive it (held by a forked child): the exit is what counts.
        self._announce_death(worker.worker_id)
        self.workers.pop(worker.worker_id, None)
        if not worker.ready:
            self.starting[worker.env_key] -= 1
        idle = self.idle.get(worker.env_key)
        if idle and worker in idle:
            idle.remove(worker)
        if worker.lease is not None:
            self._end_lease(worker.lease)
        if worker.conn is not None:
            worker.conn.close()

    def _make_idle(self, worker: _Worker) -> None:
        worker.idle_since = time.monotonic()
        self.idle.setdefault(worker.env_key, []).append(worker)

    def _kill_worker(self, worker: _Worker) -> None:
        if worker.pid:
            _kill(worker.pid)
        self._worker_died(worker)

    def _reap_idle_workers(self) -> None:
        """Stop workers idle for a while, keeping as many as there are CPUs."""
        if self.stopping.is_set():
            return
        keep = int(self.total.get("CPU", 0))
        now = time.monotonic()
        alive = sum(1 for w in self.workers.values() if not w.dead)
        for env_key, idle in self.idle.items():
            for worker in list(idle):
                if alive <= keep and env_key == ():
                    break
                if now - worker.idle_since > IDLE_WORKER_SECONDS:
                    idle.remove(worker)
                    self._kill_worker(worker)
                    alive -= 1
        self.reactor.call_later(IDLE_WORKER_SECONDS / 2, self._reap_idle_workers)

    def _on_kill_worker(self, conn: Connection, message: tuple) -> None:
        """The control loop ends an actor's process (ignored from a leader whose tenure
        ended: its successor decides now)."""
        if self._stale_leader(message[2]):
            return
        worker = self.workers.get(message[1])
        if worker is not None:
            self._kill_worker(worker)

    def _stale_leader(self, epoch: int) -> bool:
        """Whether a control-loop epoch is older than one seen here (then its requests are
        refused); newer ones are remembered."""
        if epoch < self.leader_epoch:
            return True
        self.leader_epoch = epoch
        return False

    # -- leases -----------------------------------------------------------------------------
    def _on_lease(self, conn: Connection, message: tuple) -> None:
        _, call_id, request = message
        if request.get("actor") and self._stale_leader(request.get("epoch", 0)):
            conn.send(("reply", call_id, ("stale",)))
            return
        resources = scheduling.normalize(request["resources"])
        runtime_env = request.get("runtime_env") or {}
        env_vars = runtime_env.get("env_vars") or request.get("env_vars") or {}
        env_key = tuple(sorted(env_vars.items()))
        if env_spec.needs_setup(runtime_env):
            env_key += ((ENV_MARK, env_spec.digest(env_spec.setup_part(runtime_env))),)
            if env_key not in self.env_of and len(self.env_of) >= MAX_ENVS:
                error = exceptions.RuntimeEnvSetupError(
                    f"This node already serves {MAX_ENVS} distinct runtime envs."
                )
                conn.send(("reply", call_id, ("error", error)))
                return
        if runtime_env and (env_key in self.env_of or len(self.env_of) < MAX_ENVS):
            self.env_of.setdefault(env_key, runtime_env)
        groups = {placement_group_of(r) for r in resources} - {None}
        if any(group in self.bundles.removed for group in groups):
            error = exceptions.TaskUnschedulableError(
                "The placement group this task or actor should run in was removed."
            )
            conn.send(("reply", call_id, ("error", error)))
            return
        decision = scheduling.decide(
            resources,
            request.get("strategy"),
            self._local_view(),
            self.cluster_view,
            spilled=request.get("spilled", False),
        )
        if decision.kind == "spill":
            _reply_spillback(conn, call_id, decision.node)
            return
        if decision.kind == "error":
            error = exceptions.TaskUnschedulableError(decision.message)
            conn.send(("reply", call_id, ("error", error)))
            return
        strategy = request.get("strategy")
        undecided = decision.kind == "unknown"
        self.pending.append(
            _Request(
                conn,
                call_id,
                resources,
                env_vars,
                env_key,
                request["name"],
                actor=bool(request.get("actor")),
                capture=bool(isinstance(strategy, dict) and strategy.get("capture")),
                strategy=strategy,
                spilled=bool(request.get("spilled")),
                since=time.monotonic(),
                undecided=undecided,
                gpu=_uses_gpu(resources),
            )
        )
        self._schedule()

    def _redecide(self, request: _Request) -> scheduling.Decision:
        """Where a pending request would go now, with the current view of the cluster."""
        return scheduling.decide(
            request.resources, request.strategy, self._local_view(), self.cluster_view, False
        )

    def _spill(self, request: _Request, node: scheduling.NodeView) -> None:
        self.pending.remove(request)
        _reply_spillback(request.conn, request.call_id, node)

    def _spill_busy(self, request: _Request) -> bool:
        """This node is busy: send the request where it can run now, if such a node is known."""
        decision = self._redecide(request)
        if decision.kind != "spill":
            return False
        self._spill(request, decision.node)
        return True

    def _place_elsewhere(self, request: _Request, now: float) -> None:
        """A request this node can never run: spill it once a node that fits is known."""
        decision = self._redecide(request)
        if request.undecided:
            if decision.kind == "unknown" and now - request.since < UNKNOWN_NODE_SECONDS:
                return
            request.undecided = False
            if decision.kind in ("error", "unknown"):
                self.pending.remove(request)
                error = exceptions.TaskUnschedulableError(
                    decision.message
                    or f"The node named by the scheduling strategy of {request.name} does not "
                    "exist in the cluster."
                )
                request.conn.send(("reply", request.call_id, ("error", error)))
                return
            if decision.kind == "local":
                return  # granted by the normal pass
        if decision.kind == "spill" and not request.spilled:
            self._spill(request, decision.node)
        elif not request.warned and now - request.since > INFEASIBLE_WARNING_SECONDS:
            request.warned = True
            # Once per shape and requester: many tasks of one shape make one warning.
            warned = request.conn.info.setdefault("infeasible_shapes", set())
            shape = tuple(sorted(request.resources.items()))
            if shape not in warned:
                warned.add(shape)
                self._warn_infeasible(request.conn, request.name, request.resources)

    def _warn_infeasible(self, conn: Connection, name: str, resources: dict[str, float]) -> None:
        short = scheduling.missing(resources, self.total)
        conn.send(
            (
                "warn",
                f"WARNING: The following resource request cannot be scheduled right now: "
                f"{resources} (for {name}). No node in the cluster has {short}; the request "
                "stays pending until a node that fits joins the cluster.",
            )
        )

    def _local_view(self) -> scheduling.NodeView:
        return scheduling.NodeView(self.node_id, self.address, self.total, self.available)

    def _schedule(self) -> None:
        """Grant what fits, in arrival order; start workers for what waits on one.

        Requests that fit but find no idle worker claim their resources for this pass, so
        only as many workers start as the free resources can run at once (16 queued lease
        requests on 2 free CPUs start 2 workers, not 16)."""
        if self.stopping.is_set() or not self.pending:
            return
        waiting_for_worker: Counter = Counter()
        claimed: Counter = Counter()  # resources of the requests waiting for a worker
        now = time.monotonic()
        for request in list(self.pending):
            if request.conn.closed:
                self.pending.remove(request)
                continue
            if request.undecided or not scheduling.fits(request.resources, self.total):
                self._place_elsewhere(request, now)
                continue
            if not scheduling.fits(request.resources, self.available):
                if self.cluster_view and not request.spilled and self._spill_busy(request):
                    continue
                if scheduling.fits(request.resources, self.total):
                    self._ask_leases_back()
                continue
            worker = self._take_idle(request)
            if worker is None:
                if scheduling.fits(request.resources, self._unclaimed(claimed)):
                    waiting_for_worker[request.env_key] += 1
                    claimed.update(request.resources)
                continue
            self.pending.remove(request)
            self._grant(request, worker)
        for env_key, needed in waiting_for_worker.items():
            if env_key and env_key[-1][0] == ENV_MARK and env_key not in self.prepared:
                self._prepare_env(env_key)
                continue
            for _ in range(needed - self.starting[env_key]):
                self._start_worker(env_key)

    def _prepare_env(self, env_key: tuple) -> None:
        """Set up a runtime env (off this thread); its requests wait meanwhile."""
        if env_key in self.preparing:
            return
        self.preparing.add(env_key)
        self.envs.prepare(
            self.env_of[env_key],
            lambda prepared, error: self.reactor.call_soon(
                self._env_prepared, env_key, prepared, error
            ),
        )

    def _env_prepared(self, env_key: tuple, prepared: Prepared | None, error: str | None) -> None:
        """A runtime env is ready (its workers start), or failed: its waiting requests get
        RuntimeEnvSetupError."""
        self.preparing.discard(env_key)
        if prepared is not None:
            self.prepared[env_key] = prepared
        else:
            failed = [r for r in self.pending if r.env_key == env_key]
            self.pending = [r for r in self.pending if r.env_key != env_key]
            for request in failed:
                reply = ("error", exceptions.RuntimeEnvSetupError(error))
                request.conn.send(("reply", request.call_id, reply))
        self._schedule()

    def _take_idle(self, request: _Request) -> _Worker | None:
        """An idle worker for the request's runtime env and kind of work (as Ray, a worker
        that ran GPU work never runs CPU-only work, nor the reverse)."""
        idle = self.idle.get(request.env_key)
        if not idle:
            return None
        for index in range(len(idle) - 1, -1, -1):
            worker = idle[index]
            if worker.gpu is None or worker.gpu == request.gpu:
                del idle[index]
                return worker
        return None

    def _unclaimed(self, claimed: Counter) -> dict[str, float]:
        if not claimed:
            return self.available
        unclaimed = dict(self.available)
        for name, amount in claimed.items():
            unclaimed[name] = unclaimed.get(name, 0.0) - amount
        return unclaimed

    def _grant(self, request: _Request, worker: _Worker) -> None:
        if worker.gpu is None:
            worker.gpu = request.gpu
        for name, amount in request.resources.items():
            self.available[name] = self.available.get(name, 0.0) - amount
        gpu_ids = []
        gpus = request.resources.get("GPU", 0)
        if gpus:
            count = max(1, int(gpus))
            gpu_ids, self.gpu_free = self.gpu_free[:count], self.gpu_free[count:]
        lease = _Lease(
            next(self.lease_ids),
            worker,
            request.resources,
            request.conn,
            gpu_ids,
            actor=request.actor,
        )
        self.leases[lease.lease_id] = lease
        worker.lease = lease
        grant = {"lease_id": lease.lease_id, "gpu_ids": gpu_ids, "resources": request.resources}
        groups = {placement_group_of(r) for r in request.resources} - {None}
        if groups:
            grant["pg_id"] = groups.pop()
            grant["capture"] = request.capture
        request.conn.send(
            ("reply", request.call_id, ("granted", lease.lease_id, worker.address, grant))
        )

    def _ask_leases_back(self) -> None:
        """Requests wait for resources: holders return their leases as soon as they idle."""
        for lease in self.leases.values():
            if not lease.reclaim_sent:
                lease.reclaim_sent = True
                lease.holder.send(("lease_reclaim", lease.lease_id))

    def _end_lease(self, lease: _Lease) -> None:
        if self.leases.pop(lease.lease_id, None) is None:
            return
        for name, amount in lease.resources.items():
            if name == "CPU":
                amount -= lease.lent_cpu
            self.available[name] = self.available.get(name, 0.0) + amount
        self.gpu_free.extend(lease.gpu_ids)
        lease.worker.lease = None

    def _hold(self, resources: dict[str, float]) -> None:
        """A job's entrypoint takes its resources (available may go below zero: tasks then
        wait until theirs come back)."""
        for name, amount in scheduling.normalize(resources).items():
            self.available[name] = self.available.get(name, 0.0) - amount

    def _release(self, resources: dict[str, float]) -> None:
        for name, amount in scheduling.normalize(resources).items():
            self.available[name] = self.available.get(name, 0.0) + amount
        self._schedule()

    def _on_lease_return(self, conn: Connection, message: tuple) -> None:
        _, lease_id, kill = message
        lease = self.leases.get(lease_id)
        if lease is None:
            return
        self._end_lease(lease)
        worker = lease.worker
        if kill or worker.retiring:
            self._kill_worker(worker)
        elif not worker.dead:
            self._make_idle(worker)
        self._schedule()

    def _on_lease_resize(self, conn: Connection, message: tuple) -> None:
        """An actor is up: it keeps only its running resources (Ray: 1 CPU to place, 0 to run)."""
        _, lease_id, resources = message
        lease = self.leases.get(lease_id)
        if lease is None:
            return
        resources = scheduling.normalize(resources)
        for name in set(lease.resources) | set(resources):
            delta = lease.resources.get(name, 0.0) - resources.get(name, 0.0)
            if delta:
                self.available[name] = self.available.get(name, 0.0) + delta
        lease.resources = resources
        self._schedule()

    def _on_blocked(self, conn: Connection, message: tuple) -> None:
        worker = self.workers.get(conn.info.get("worker_id"))
        lease = worker.lease if worker is not None else None
        if lease is None or lease.lent_cpu:
            return
        lease.lent_cpu = lease.resources.get("CPU", 0.0)
        if lease.lent_cpu:
            self.available["CPU"] = self.available.get("CPU", 0.0) + lease.lent_cpu
            self._schedule()

    def _on_retiring(self, conn: Connection, message: tuple) -> None:
        """The worker ran a function's max_calls tasks: it ends (and is replaced) as soon as
        it holds no lease: now if its owner returned the lease before this arrived."""
        worker = self.workers.get(conn.info.get("worker_id"))
        if worker is None:
            return
        worker.retiring = True
        if worker.lease is None:
            self._kill_worker(worker)
            self._schedule()

    def _on_unblocked(self, conn: Connection, message: tuple) -> None:
        worker = self.workers.get(conn.info.get("worker_id"))
        lease = worker.lease if worker is not None else None
        if lease is None or not lease.lent_cpu:
            return
        self.available["CPU"] = self.available.get("CPU", 0.0) - lease.lent_cpu
        lease.lent_cpu = 0.0

    # -- placement groups (two-phase, driven by the control loop) ---------------------------
    # The control loop calls these on the reactor thread: over a connection for any node,
    # or directly (`reactor.call_soon`) for the node whose process it runs in.
    def reserve_bundles(self, pg_id: str, bundles: list, commit: bool) -> bool:
        """Set the group's bundles aside if they all fit now; with commit, also turn them
        into the group's resources (one step, for a group placed on this node alone)."""
        if not self.bundles.prepare(pg_id, bundles):
            return False
        if commit:
            self.commit_bundles(pg_id)
        return True

    def commit_bundles(self, pg_id: str) -> None:
        if self.bundles.commit(pg_id):
            self._schedule()

    def cancel_bundles(self, pg_id: str) -> None:
        if self.bundles.cancel(pg_id):
            self._schedule()

    def remove_bundles(self, pg_id: str) -> None:
        """Give the group's bundles back; what runs in it is stopped."""
        for lease in list(self.leases.values()):
            if any(placement_group_of(r) == pg_id for r in lease.resources):
                self._end_lease(lease)
                self._kill_worker(lease.worker)
        self.bundles.remove(pg_id)
        self._schedule()

    def _on_pg_reserve(self, conn: Connection, message: tuple) -> None:
        _, call_id, pg_id, bundles, commit = message
        conn.send(("reply", call_id, self.reserve_bundles(pg_id, bundles, commit)))

    # -- object store -----------------------------------------------------------------------
    # The store belongs to the reactor thread: these handlers run there, and other threads
    # (object transfers, heartbeats) reach it through reactor.call_soon.
    def _on_alloc(self, conn: Connection, message: tuple) -> None:
        """Reserve room for an object a local process writes: an arena offset or a file path."""
        _, call_id, oid, size, owner = message
        if self.store.contains(oid):
            conn.send(("reply", call_id, files.ALREADY_STORED))
            return
        try:
            location = self.store.create(oid, size, owner)
        except (exceptions.ObjectStoreFullError, ValueError, TypeError) as exc:
            conn.send(("reply", call_id, exc))
            return
        self.creating.setdefault(conn.info.get("worker_id"), set()).add(oid)
        conn.send(("reply", call_id, location))

    def _on_seal(self, conn: Connection, message: tuple) -> None:
        oid = message[1]
        self.creating.get(conn.info.get("worker_id"), set()).discard(oid)
        try:
            sealed = self.store.seal(oid)  # False: freed while written (its owner is gone)
        except (KeyError, ValueError) as exc:
            log.warning("seal of an object that is not being written: %s", exc)
            sealed = False
        self._sealed(oid, sealed)

    def when_sealed(self, oid: bytes, callback: Callable[[bool], None]) -> None:
        """callback(True) once the object is sealed here (at once if it is), False if it
        never will be: a reader may ask for an object whose writer's seal is still on its
        way (the writer told the owner first, on another connection)."""
        if self.store.being_written(oid):
            self._seal_waiters.setdefault(oid, []).append(callback)
        else:
            callback(self.store.contains(oid))

    def _sealed(self, oid: bytes, sealed: bool) -> None:
        for callback in self._seal_waiters.pop(oid, ()):
            try:
                callback(sealed)
            except Exception:
                log.exception("seal waiter failed")

    def _on_pin(self, conn: Connection, message: tuple) -> None:
        """Map an object for a local reader, pulling it from its node first if needed."""
        _, call_id, oid, node_id, owner = message
        if self.store.contains(oid) or node_id == self.node_id:
            self.when_sealed(oid, lambda _: self._answer_pin(conn, call_id, oid, copied=False))
            return

        def pulled(error: BaseException | None) -> None:
            if error is not None:
                conn.send(("reply", call_id, error))
            else:
                self._answer_pin(conn, call_id, oid, copied=True)

        address = self.object_managers.get(node_id)
        if address is not None:
            self.object_manager.pull(oid, address, owner, pulled)
            return

        def locate() -> None:  # a node our view has not caught up with yet: ask the GCS
            found = None
            try:
                info = self.gcs.node(node_id)
                if info and info.get("state") == "ALIVE":
                    found = info.get("object_manager_address")
            finally:  # the reader is answered even when the GCS cannot be asked
                self.reactor.call_soon(self.object_manager.pull, oid, found, owner, pulled)

        self.publish_later(locate)

    def _answer_pin(self, conn: Connection, call_id: int, oid: bytes, copied: bool) -> None:
        """Pin an object for a reader; the reply is (location, size, copied) or an error."""
        try:
            location = self.store.get(oid)
        except Exception as exc:  # e.g. its spill file could not be read back
            log.warning("object %s could not be read: %r", oid.hex(), exc)
            error = exc if isinstance(exc, exceptions.RayError) else None
            conn.send(("reply", call_id, error or exceptions.ObjectLostError(oid.hex())))
            return
        if location is None:
            conn.send(("reply", call_id, exceptions.ObjectLostError(oid.hex())))
            return
        conn.info["pins"][oid] += 1
        conn.send(("reply", call_id, (*location, copied)))

    def _on_unpin(self, conn: Connection, message: tuple) -> None:
        oid = message[1]
        pins = conn.info.get("pins")
        if pins is None or pins[oid] <= 0:
            return
        pins[oid] -= 1
        if not pins[oid]:
            del pins[oid]
        self.release_pin(oid)

    def release_pin(self, oid: bytes) -> None:
        try:
            self.store.release(oid)
        except (ValueError, KeyError):
            pass

    def _on_free(self, conn: Connection, message: tuple) -> None:
        for oid in message[1]:
            self.store.delete(oid)

    def _on_task_events(self, conn: Connection, message: tuple) -> None:
        """A process's task events since its last shipment (written by the sink's thread)."""
        worker_id = conn.info.get("worker_id")
        process = {"worker_id": worker_id.hex() if worker_id else "", "pid": conn.info.get("pid")}
        self.task_events.ingest(process, message[1], message[3], message[2])

    def _on_store_stats(self, conn: Connection, message: tuple) -> None:
        conn.send(("reply", message[1], self.store.stats()))

    def _on_resources(self, conn: Connection, message: tuple) -> None:
        """This node's total and available resources now (heartbeats lag by up to 0.5 s)."""
        reply = {
            "resources": dict(self.total),
            "available": dict(self.available),
            "object_store_memory": self.store.capacity,
        }
        conn.send(("reply", message[1], reply))

    def _on_debug_state(self, conn: Connection, message: tuple) -> None:
        """This node's scheduling state, for diagnosing stuck work (pids, not ids)."""

        def pid_of(client: Connection) -> Any:
            return getattr(self.workers.get(client.info.get("worker_id")), "pid", "client")

        state = {
            "available": self.available,
            "pending": [(r.resources, r.name, r.conn.info.get("mode")) for r in self.pending],
            "leases": {
                lease.lease_id: (
                    lease.worker.pid,
                    lease.resources,
                    lease.lent_cpu,
                    pid_of(lease.holder),
                )
                for lease in self.leases.values()
            },
            "workers": {w.pid: (w.ready, w.lease is not None) for w in self.workers.values()},
            "idle": {str(k): [w.pid for w in v] for k, v in self.idle.items()},
            "starting": dict(self.starting),
        }
        conn.send(("reply", message[1], state))

    # -- talking to the GCS off the reactor thread ------------------------------------------
    def publish_later(self, job: Any) -> None:
        """Run a GCS call on the writer thread (the reactor never waits on Redis)."""
        self._gcs_jobs.put(job)

    def _gcs_writer(self) -> None:
        while True:
            job = self._gcs_jobs.get()
            if job is None:
                return
            try:
                job()
            except Exception as exc:
                if self.stopping.is_set():
                    continue
                if is_connection_error(exc):  # (lost: pub/sub is a hint; said once)
                    health.lost(exc)
                else:
                    log.exception("GCS write failed")

    def _on_death_event(self, event: dict) -> None:
        """Objects here owned by a process that died on another node are freed."""
        if event.get("node_id") != self.node_id:
            owner = bytes.fromhex(event["worker_id"])
            self.reactor.call_soon(self.store.delete_owned_by, owner)

    # -- heartbeats -------------------------------------------------------------------------
    # The heartbeat thread never reads the reactor's state (resources, pending requests, the
    # store) itself: the reactor thread prepares a snapshot for each beat. If the reactor is
    # too busy to answer in time, the beat carries the previous snapshot: the node is alive.
    def _beat_snapshot(self) -> dict[str, Any]:
        """What a heartbeat reports (reactor thread); immutable once made."""
        stats = self.store.stats()
        return {
            "available": dict(self.available),
            "total": dict(self.total),
            "load": {
                "pending": len(self.pending),
                "store_used": stats["used"],
                "store_capacity": stats["capacity"],
                "spilled_bytes": stats["spilled_bytes"],
                "disk_bytes": stats["disk_bytes"],
                "num_objects": stats["num_objects"],
                "num_spilled": stats["num_spilled"],
                "spilled_objects": stats["spilled_objects"],
                "restored_objects": stats["restored_objects"],
                "fallback_objects": stats["fallback_objects"],
                "leases": len(self.leases),
                "workers": len(self.workers),
            },
        }

    def _fresh_snapshot(self, previous: dict[str, Any] | None) -> dict[str, Any]:
        """Ask the reactor thread for a snapshot; `previous` if it does not answer in time."""
        done = threading.Event()
        box: list[dict[str, Any]] = []

        def take() -> None:
            try:
                box.append(self._beat_snapshot())
            finally:
                done.set()

        self.reactor.call_soon(take)
        if done.wait(SNAPSHOT_WAIT_SECONDS) and box:
            return box[0]
        if previous is not None:
            return previous
        # Nothing known yet: report no free resources rather than guess.
        return {"available": {}, "total": None, "load": {}}

    def _apply_cluster_view(
        self, view: list[scheduling.NodeView], managers: dict[str, tuple[str, int]]
    ) -> None:
        """Take the cluster as the last heartbeat read it from the GCS (reactor thread)."""
        self.cluster_view = view
        self.object_managers = managers
        self._schedule()

    def _heartbeat_loop(self) -> None:
        """Beat every HEARTBEAT_SECONDS and take the cluster view the beat reads back.

        While Redis is away the node keeps serving (no task needs Redis) and beats again with
        backoff; the outage is logged once each way. Past the outage limit it stops. A beat
        that finds the node's entry gone registers it again; one that finds it dead stops."""
        snapshot: dict[str, Any] | None = None
        live: LiveNodes | None = None  # read again as changes since the last beat's read
        lost_since: float | None = None
        last_error = ""
        delay = HEARTBEAT_SECONDS
        while not self.stopping.wait(delay):
            try:
                snapshot = self._fresh_snapshot(snapshot)
                status = self.gcs.heartbeat(
                    self.node_id,
                    snapshot["available"],
                    self.config["node_timeout"],
                    snapshot["load"],
                    snapshot["total"],
                    _host_stats(),
                )
                lost_since, delay = None, HEARTBEAT_SECONDS
                health.back()  # (says so once if Redis was away, whoever noticed it then)
                if status is not HeartbeatStatus.OK and not self._entry_lost(status, snapshot):
                    return
                live = self.gcs.node_changes(live)
            except Exception as exc:
                if not is_connection_error(exc):
                    if repr(exc) != last_error:  # a lasting failure is logged once
                        last_error = repr(exc)
                        log.exception("heartbeat failed")
                    continue
                now = time.monotonic()
                if lost_since is None:
                    lost_since = now
                    health.lost(exc)
                elif now - lost_since >= self.outage_limit:
                    log.error(
                        "Redis has been unreachable for %.0f s (%s=%g): this node gives up "
                        "and stops, with its workers.",
                        now - lost_since,
                        OUTAGE_ENV,
                        self.outage_limit,
                    )
                    self._leave()
                    return
                delay = min(delay * 2, HEARTBEAT_BACKOFF_MAX_SECONDS)
                continue
            last_error = ""
            self._take_view(list(live.nodes.values()))  # (also the scheduler's periodic pass)

    def _take_view(self, nodes: list[dict[str, Any]]) -> None:
        """Hand the live nodes a beat read to the reactor thread."""
        view = [
            scheduling.NodeView(
                n["node_id"],
                tuple(n["raylet_address"]),
                n.get("resources", {}),
                n.get("available", {}),
                n["alive"],
            )
            for n in nodes
            if n["node_id"] != self.node_id
        ]
        managers = {
            n["node_id"]: tuple(n["object_manager_address"])
            for n in nodes
            if n["alive"] and n.get("object_manager_address")
        }
        self.reactor.call_soon(self._apply_cluster_view, view, managers)

    def _entry_lost(self, status: HeartbeatStatus, snapshot: dict[str, Any]) -> bool:
        """A beat found no live entry for this node (heartbeat thread). UNKNOWN: Redis lost
        it (restarted empty, or without its last writes): register again under the same id,
        putting the cluster entry back if needed; True. DEAD: the cluster declared the node
        dead and restarted its actors and tasks elsewhere: stop (False).

        A node declared dead stops rather than joining again under a new id: every worker,
        object location and bundle here carries the old id, and its actors already run
        elsewhere, so it could only go on after killing all of them, which is what a new
        node started by its supervisor does cleanly (Ray's raylet exits the same way)."""
        if status is HeartbeatStatus.UNKNOWN:
            registration = {**self._registration, "available": snapshot["available"]}
            try:
                self.gcs.rejoin_cluster(
                    self.token,
                    self.node_id,
                    registration,
                    self.config["node_timeout"],
                    {"created_by": self.node_id},
                )
            except NodeDeadError:
                status = HeartbeatStatus.DEAD
            except ValueError as exc:
                log.error("Cannot register this node again (%s): it stops.", exc)
                self._leave()
                return False
            else:
                log.warning(
                    "Redis had lost this node's entry (restarted without its data?): "
                    "registered again as node %s.",
                    self.node_id,
                )
                return True
        log.error(
            "This node (%s) was declared dead by the cluster (its heartbeats stopped reaching "
            "Redis for longer than the node timeout), so its actors and tasks were restarted "
            "elsewhere: it stops now, with its workers, instead of running them twice. Start a "
            "new node to add this machine again.",
            self.node_id,
        )
        self._leave()
        return False

    def _leave(self) -> None:
        """Stop the node because of the GCS (from the heartbeat thread): exit status 1."""
        self.exit_code = 1
        self.reactor.call_soon(self.stop, False)


def _host_stats() -> dict[str, float]:
    """The machine's CPU and memory use, for the dashboard and the metrics (heartbeat
    thread: a few reads of /proc per beat, nothing on the task path)."""
    memory = psutil.virtual_memory()
    return {
        "cpu_percent": psutil.cpu_percent(interval=None),
        "cpu_count": psutil.cpu_count() or 0,
        "mem_total": memory.total,
        "mem_available": memory.available,
        "mem_used": memory.total - memory.available,
    }


def _uses_gpu(resources: dict[str, float]) -> bool:
    """Whether a request takes GPUs (of the node, or of a placement group's bundle)."""
    return any(name == "GPU" or name.startswith("GPU_group_") for name in resources)


def _reply_spillback(conn: Connection, call_id: int, node: scheduling.NodeView) -> None:
    """Answer a lease request with "try node X"."""
    conn.send(("reply", call_id, ("spillback", node.node_id, node.raylet_address)))


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def main() -> None:
    """Run a raylet: read config from stdin, print node info as one JSON line when ready."""
    config = json.loads(sys.stdin.readline())
    # Our stdout carries one line (the node's description) to whoever started us; everything
    # else printed here or in workers goes to the log, so a pipe nobody reads never fills.
    ready_out = os.dup(1)
    os.dup2(2, 1)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if config.get("die_with_parent"):
        worker_pool.die_with_parent()
    redis_server = None
    if config.get("start_redis"):
        redis_server = RedisServer.start(
            host=config["node_ip_address"],
            port=config.get("redis_port", 0),
            password=config.get("redis_password"),
            directory=config["session_dir"],
        )
        config["gcs_url"] = redis_server.url
    worker_config = {
        "log_dir": os.path.join(config["session_dir"], "logs"),
        "token": bytes.fromhex(config["token"]),
        "gcs_url": config["gcs_url"],
        "cluster": config["cluster"],
        "listen_host": config["node_ip_address"],
    }
    zygote = worker_pool.start_zygote(worker_config, close_fds=[ready_out])
    raylet = Raylet(config, zygote)
    raylet.redis_server = redis_server
    info = raylet.start()
    os.write(ready_out, (json.dumps(info) + "\n").encode())
    os.close(ready_out)
    signal.signal(signal.SIGTERM, lambda *_: raylet.reactor.call_soon(raylet.stop))
    if config.get("watch_stdin"):
        threading.Thread(target=_exit_on_eof, args=(raylet,), daemon=True).start()
    raylet.reactor.thread.join()
    sys.exit(raylet.exit_code)


def _exit_on_eof(raylet: Raylet) -> None:
    """A private cluster ends with its driver: stdin closes when the driver exits."""
    try:
        sys.stdin.read()
    except Exception:
        pass
    raylet.reactor.call_soon(raylet.stop)


if __name__ == "__main__":
    main()
