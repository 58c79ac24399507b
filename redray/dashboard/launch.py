"""Starting the dashboard process (and a node's metrics exporter, the same program).

The launching process binds the listening socket itself and hands it to the child: a port
in use fails at once with a clear error, and the URL is known before the child has imported
aiohttp (requests arriving meanwhile wait in the listen backlog). The Redis URL, which holds
the password, goes to the child on its stdin, never on its command line.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from redray.dashboard import deps

DEFAULT_PORT = 8265  # Ray's
PORT_RETRIES = 50
KV_NAMESPACE = "dashboard"
KV_URL = "dashboard_url"  # with the default port, the next free one up to this many above (as Ray)
NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int | None, what: str = "dashboard") -> socket.socket:
    """A listening socket on host:port; with port None, DEFAULT_PORT or the next free one.

    ValueError when an explicit port is taken (or no port of the range is free)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    candidates = [port] if port is not None else range(DEFAULT_PORT, DEFAULT_PORT + PORT_RETRIES)
    last_error: OSError | None = None
    for candidate in candidates:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, candidate))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            last_error = exc
            continue
        sock.set_inheritable(True)
        return sock
    flag = "--dashboard-port" if what == "dashboard" else "--metrics-export-port"
    raise ValueError(
        f"Failed to bind the {what} to {host}:{port if port is not None else DEFAULT_PORT} "
        f"({last_error.strerror if last_error else 'no free port'}). Use {flag} (or "
        "init(dashboard_port=...)) to select a different port."
    )


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def record_url(gcs: Any, url: str) -> None:
    """Tell the cluster where its dashboard is (what init() returns as `dashboard_url`:
    host:port, as Ray gives it)."""
    gcs.kv_put(KV_URL, url.split("://", 1)[-1].encode(), namespace=KV_NAMESPACE)


def recorded_url(gcs: Any) -> str | None:
    """The cluster's dashboard (host:port), when one was started."""
    raw = gcs.kv_get(KV_URL, namespace=KV_NAMESPACE)
    return raw.decode() if raw else None


@dataclass
class DashboardProcess:
    """A dashboard (or node exporter) process we started, and where it listens."""

    process: subprocess.Popen
    url: str
    host: str

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout: float = 5.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start(
    *,
    gcs_url: str,
    cluster: str,
    host: str = "127.0.0.1",
    port: int | None = None,
    log_dir: str,
    node_id: str | None = None,
    detached: bool = False,
) -> DashboardProcess:
    """Start the dashboard (node_id None) or node_id's metrics exporter, listening on
    host:port; detached ones outlive us (`redray stop` ends them), the others die with us.

    DashboardDependencyError without the `dashboard` extra; ValueError for a taken port."""
    deps.check()
    what = "dashboard" if node_id is None else "metrics exporter"
    sock = bind(host, port, what)
    try:
        config = {
            "gcs_url": gcs_url,
            "cluster": cluster,
            "fd": sock.fileno(),
            "node_id": node_id,
            "die_with_parent": not detached,
            "auth": not is_loopback(host),
        }
        name = "dashboard.log" if node_id is None else "metrics_export.log"
        log_fd = os.open(os.path.join(log_dir, name), NEW_FILE, 0o600)
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "redray.dashboard"],
                stdin=subprocess.PIPE,
                stdout=log_fd,
                stderr=log_fd,
                pass_fds=(sock.fileno(),),
                start_new_session=detached,
                close_fds=True,
            )
        finally:
            os.close(log_fd)
        process.stdin.write((json.dumps(config) + "\n").encode())
        process.stdin.close()
        return DashboardProcess(process, url_of(sock), host)
    finally:
        sock.close()
