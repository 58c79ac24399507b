"""The dashboard's web server (aiohttp): pages, the JSON API under /api/ that they poll, and
/metrics for Prometheus. Every answer is read from the state API when asked (Redis and the
nodes), in a small thread pool so a slow read never stalls the event loop; nothing is kept
between requests.

Bound to a loopback address it serves anyone on this machine (as the Redis and raylet
listeners do). Bound elsewhere, every request must carry the cluster token: an
`Authorization: Bearer <token hex>` header, or the cookie the login form sets (an HMAC of
the token, not the token); both are compared in constant time, and anything else gets 401.
A node's metrics exporter serves only /metrics.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import os
import socket
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from redray.dashboard.metrics import ClusterCollector
from redray.gcs import Gcs
from redray.state import api as state_api
from redray.state import cluster as state_cluster
from redray.state import keys as state_keys
from redray.state import tasks as state_tasks
from redray.state import timeline
from redray.state.client import RayStateApiException

log = logging.getLogger("redray.dashboard")

STATIC_DIR = os.path.join(os.path.dirname(__file__), "static")
PAGES = ("/", "/jobs", "/actors", "/tasks", "/placement-groups", "/logs")
COOKIE = "redray_dashboard"
MAX_LIMIT = 10_000  # rows one API call returns at most
MAX_LOG_TAIL = 10_000  # lines the log viewer reads at most
QUERY_TIMEOUT_SECONDS = 10
MAX_PENDING_READS = 64  # requests waiting for the read pool; more get 503 (bounded memory)
RESOURCES = ("nodes", "jobs", "actors", "placement_groups", "workers")


def session_cookie(token: bytes) -> str:
    """What the login cookie holds: proof of the token that does not reveal it."""
    return hmac.new(token, b"redray-dashboard-session", "sha256").hexdigest()


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(
        data, status=status, dumps=lambda d: json.dumps(d, default=_default, separators=(",", ":"))
    )


def _default(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


class Dashboard:
    """The web application over one cluster (node_id given: that node's exporter)."""

    def __init__(self, gcs: Gcs, auth: bool, node_id: str | None = None):
        self.gcs = gcs
        self.node_id = node_id
        token = gcs.cluster_token()
        if token is None:
            raise RuntimeError(f"no redray cluster {gcs.cluster!r} in this Redis")
        self.token_hex = token.hex().encode()
        self.cookie = session_cookie(token).encode()
        self.auth = auth
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="dashboard")
        self.pending_reads = 0  # (event-loop thread)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ClusterCollector(gcs, node_id))

    async def _run(self, func: Any, *args: Any) -> Any:
        """func(*args) on the read pool; 503 when too many requests already wait for it."""
        if self.pending_reads >= MAX_PENDING_READS:
            raise web.HTTPServiceUnavailable(
                text=json.dumps({"error": "the dashboard is busy: try again"}),
                content_type="application/json",
            )
        self.pending_reads += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, func, *args)
        finally:
            self.pending_reads -= 1

    # -- the application ---------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard, self._errors])
        app.router.add_get("/metrics", self.metrics)
        if self.node_id is None:
            for path in PAGES:
                app.router.add_get(path, self.page)
            app.router.add_get("/login", self.login_form)
            app.router.add_post("/login", self.login)
            app.router.add_get("/api/overview", self.overview)
            app.router.add_get("/api/tasks", self.list_tasks)
            app.router.add_get("/api/tasks/{task_id}", self.get_task)
            app.router.add_get("/api/logs", self.list_logs)
            app.router.add_get("/api/logs/file", self.read_log)
            app.router.add_get("/api/timeline", self.timeline)
            app.router.add_get("/api/cluster_address", self.cluster_address)
            app.router.add_get("/api/{resource}", self.list_resource)
            app.router.add_static("/static/", STATIC_DIR)
        return app

    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            return hmac.compare_digest(header[7:].strip().encode(), self.token_hex)
        cookie = request.cookies.get(COOKIE)
        return cookie is not None and hmac.compare_digest(cookie.encode(), self.cookie)

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if not self.auth or request.path == "/login" or self._authorized(request):
            return await handler(request)
        if request.path.startswith("/api/") or request.path == "/metrics":
            return web.json_response(
                {"error": "unauthorized: send the cluster token (Authorization: Bearer ...)"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="redray"'},
            )
        return self._login_page(status=401)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            return _json({"error": f"{type(exc).__name__}: {exc}"}, status=400)
        except RayStateApiException as exc:
            return _json({"error": str(exc)}, status=503)
        except Exception as exc:  # Redis away, a node gone: say so, keep serving
            log.exception("request %s failed", request.path)
            return _json({"error": f"{type(exc).__name__}: {exc}"}, status=503)

    # -- login -------------------------------------------------------------------------------
    def _login_page(self, status: int = 200, error: str = "") -> web.Response:
        with open(os.path.join(STATIC_DIR, "login.html")) as f:
            html = f.read().replace("{{error}}", error)
        return web.Response(text=html, content_type="text/html", status=status)

    async def login_form(self, request: web.Request) -> web.Response:
        return self._login_page()

    async def login(self, request: web.Request) -> web.Response:
        form = await request.post()
        given = str(form.get("token", "")).strip().encode()
        if not hmac.compare_digest(given, self.token_hex):
            return self._login_page(status=401, error="That is not this cluster's token.")
        response = web.HTTPSeeOther("/")
        response.set_cookie(COOKIE, self.cookie.decode(), httponly=True, samesite="Strict")
        raise response

    # -- pages -------------------------------------------------------------------------------
    async def page(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(os.path.join(STATIC_DIR, "index.html"))

    # -- the JSON API ------------------------------------------------------------------------
    def _overview(self) -> dict[str, Any]:
        gcs = self.gcs
        nodes = []
        for info in gcs.nodes():
            nodes.append(
                {
                    "node_id": info["node_id"],
                    "node_ip": info.get("node_ip_address"),
                    "hostname": info.get("hostname"),
                    "is_head_node": bool(info.get("is_head")),
                    "state": "ALIVE" if info.get("alive") else "DEAD",
                    "state_message": info.get("death_cause") or info.get("cause"),
                    "resources_total": info.get("resources") or {},
                    "resources_available": info.get("available") or {},
                    "object_store_memory": info.get("object_store_memory"),
                    "load": info.get("load") or {},
                    "start_time_ms": int(float(info["start_time"]) * 1000)
                    if info.get("start_time")
                    else None,
                }
            )
        actors = Counter(a.state for a in state_cluster.actors(gcs))
        groups = Counter(p.state for p in state_cluster.placement_groups(gcs))
        jobs = Counter(j.status for j in state_cluster.jobs(gcs))
        return {
            "cluster": gcs.cluster,
            "time_ms": int(time.time() * 1000),
            "nodes": nodes,
            "tasks": self._task_counts(),
            "actors": dict(actors),
            "placement_groups": dict(groups),
            "jobs": dict(jobs),
            "task_events_dropped": state_keys.dropped_counts(gcs),
            "warnings": state_tasks.dropped_warnings(gcs),
        }

    def _task_counts(self) -> dict[str, int]:
        """Stored attempts by state, from the sizes of the state indexes (a few Redis calls
        whatever the number of tasks: the overview is polled); finished ones are the rest."""
        states = [s for s in state_keys.TASK_STATES if s not in ("NIL", "FINISHED")]
        sizes = state_keys.index_sizes(
            self.gcs, [state_keys.index_key(self.gcs, "state", s) for s in states]
        )
        counts = {s: n for s, n in zip(states, sizes, strict=True) if n}
        finished = state_keys.task_count(self.gcs) - sum(counts.values())
        if finished > 0:
            counts["FINISHED"] = finished
        return counts

    async def cluster_address(self, request: web.Request) -> web.Response:
        """The cluster's Redis URL, for clients given the dashboard's address (the job API):
        it carries the Redis password, so the cluster token is asked for even on loopback."""
        if not self._authorized(request):
            return web.json_response(
                {"error": "unauthorized: send the cluster token (Authorization: Bearer ...)"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="redray"'},
            )
        return _json({"address": self.gcs.url, "cluster": self.gcs.cluster})

    async def overview(self, request: web.Request) -> web.Response:
        return _json(await self._run(self._overview))

    async def list_resource(self, request: web.Request) -> web.Response:
        resource = request.match_info["resource"]
        if resource not in RESOURCES:
            raise web.HTTPNotFound(text=json.dumps({"error": f"no API {resource!r}"}))
        limit = _limit(request)
        result = await self._run(
            lambda: state_api.list_resource(
                self.gcs, resource, None, limit, True, QUERY_TIMEOUT_SECONDS
            )
        )
        return _json(_listed(result))

    async def list_tasks(self, request: web.Request) -> web.Response:
        filters = [
            (column, "=", request.query[column])
            for column in ("state", "name", "job_id", "actor_id", "node_id")
            if request.query.get(column)
        ]
        limit = _limit(request)
        result = await self._run(
            lambda: state_api.list_resource(self.gcs, "tasks", filters, limit, True)
        )
        return _json(_listed(result))

    async def get_task(self, request: web.Request) -> web.Response:
        task_id = request.match_info["task_id"]
        attempts = await self._run(
            lambda: (
                state_api.list_resource(
                    self.gcs, "tasks", [("task_id", "=", task_id)], 64, True
                ).items
            )
        )
        if not attempts:
            return _json({"error": f"no task {task_id}"}, status=404)
        return _json({"result": attempts})

    async def list_logs(self, request: web.Request) -> web.Response:
        node_id = request.query.get("node_id") or None
        glob = request.query.get("glob") or None
        found = await self._run(
            lambda: state_api.logs_of(self.gcs, node_id, None, glob, QUERY_TIMEOUT_SECONDS)
        )
        return _json({"result": found})

    async def read_log(self, request: web.Request) -> web.Response:
        node_id = request.query.get("node_id") or None
        filename = request.query.get("filename")
        if not filename:
            raise ValueError("filename is required")
        tail = min(int(request.query.get("tail", "1000")), MAX_LOG_TAIL)

        def read() -> str:
            return "".join(
                state_api.log_chunks(
                    self.gcs,
                    node_id=node_id,
                    filename=filename,
                    tail=tail,
                    timeout=QUERY_TIMEOUT_SECONDS,
                    errors="replace",
                )
            )

        text = await self._run(read)
        return web.Response(text=text, content_type="text/plain")

    async def timeline(self, request: web.Request) -> web.Response:
        trace = await self._run(timeline.chrome_trace, self.gcs)
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
        return web.Response(
            body=json.dumps(trace).encode(),
            content_type="application/json",
            headers={"Content-Disposition": f'attachment; filename="timeline-{stamp}.json"'},
        )

    async def metrics(self, request: web.Request) -> web.Response:
        body = await self._run(generate_latest, self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit", "1000")
    limit = int(raw)
    if limit <= 0:
        raise ValueError(f"limit must be a positive integer, got {raw!r}")
    return min(limit, MAX_LIMIT)


def _listed(result: Any) -> dict[str, Any]:
    return {
        "result": result.items,
        "total": result.total,
        "num_filtered": result.num_filtered,
        "warnings": result.warnings,
        "partial_failures": result.partial_failures,
    }


def serve(config: dict[str, Any]) -> None:
    """Run the dashboard (or a node exporter) on the socket its launcher bound, until
    SIGTERM."""
    gcs = Gcs(config["gcs_url"], config["cluster"])
    dashboard = Dashboard(gcs, bool(config.get("auth")), config.get("node_id"))
    sock = socket.socket(fileno=int(config["fd"]))
    web.run_app(
        dashboard.app(),
        sock=sock,
        print=None,
        access_log=None,
        handle_signals=True,
        shutdown_timeout=1.0,
    )
