"""Starting a node (a raylet process, plus Redis on a head) and finding running clusters.

Used by `redray.init()` for a private cluster and by the `redray start` / `redray node`
commands. A started node prints one JSON line describing itself; that line is all a caller
needs to connect.

The Redis of a head started by `redray start` is started here, as a process of its own with
AOF persistence (see redis_server.py): the head's raylet can die without taking the cluster
with it. A private cluster's Redis is the raylet's child and dies with it.

Everything a node writes lives under a *temp root*: `ROOT_DIR` (`<tmp>/redray-<uid>`, which
also holds the current-cluster file with the Redis password) or a `--temp-dir`. A root is
only used when it is a real directory of the current user that no one else may write
(`trusted_root`): one another user made first (in a shared /tmp anyone can) would let them
read the password, or redirect `address="auto"` to a cluster of theirs. Directories are
made 0700 and files 0600, created exclusively without following symbolic links.
"""

from __future__ import annotations

import ipaddress
import json
import os
import pwd
import select
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import psutil

from redray.node.redis_server import RedisServer

ROOT_DIR = os.path.join(tempfile.gettempdir(), f"redray-{os.getuid()}")
CURRENT_CLUSTER = os.path.join(ROOT_DIR, "current_cluster.json")
# A node missing heartbeats this long is dead (heartbeats every 0.5 s; detection <= ~4.5 s).
DEFAULT_NODE_TIMEOUT = float(os.environ.get("REDRAY_NODE_TIMEOUT", "4"))


def default_resources(
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    resources: dict[str, float] | None = None,
    node_ip_address: str = "127.0.0.1",
    head: bool = False,
    memory: float | None = None,
) -> dict[str, float]:
    """This machine's resources, as Ray reports them, overridable by the caller."""
    if num_cpus is None:
        try:
            num_cpus = len(os.sched_getaffinity(0))
        except AttributeError:
            num_cpus = os.cpu_count() or 1
    total = {"CPU": float(num_cpus)}
    if num_gpus:
        total["GPU"] = float(num_gpus)
    total["memory"] = float(memory if memory is not None else _memory_default())
    total[f"node:{node_ip_address}"] = 1.0
    if head:
        total["node:__internal_head__"] = 1.0
    for name, amount in (resources or {}).items():
        total[name] = float(amount)
    return total


def _memory_default() -> int:
    return int(psutil.virtual_memory().available * 0.7)


def default_object_store_memory() -> int:
    """30% of the machine's memory, as Ray."""
    return int(psutil.virtual_memory().total * 0.3)


_NEW_FILE = os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


class UnsafeTempDirError(PermissionError):
    """A temp root another user could write into, or a symbolic link: not used."""


def root_dir(temp_dir: str | None = None) -> str:
    """The temp root for temp_dir (default ROOT_DIR), as an absolute path."""
    return os.path.abspath(os.path.expanduser(temp_dir)) if temp_dir else ROOT_DIR


def trusted_root(temp_dir: str | None = None) -> str:
    """The temp root (see the module doc), made (mode 0700) if missing.

    UnsafeTempDirError when it is a symbolic link, not ours, or writable by group or
    others; OSError when it cannot be made."""
    root = root_dir(temp_dir)
    os.makedirs(os.path.dirname(root), exist_ok=True)
    try:
        os.mkdir(root, 0o700)
    except FileExistsError:
        pass
    check_private_dir(root, "redray's temp dir")
    return root


def check_private_dir(path: str, what: str) -> None:
    """UnsafeTempDirError unless path is a directory (not a symbolic link) of the current
    user that neither group nor others may write."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        problem = f"is a symbolic link (to {os.readlink(path)})"
    elif not stat.S_ISDIR(info.st_mode):
        problem = "is not a directory"
    elif info.st_uid != os.geteuid():
        problem = f"belongs to {_user_name(info.st_uid)}, not to you"
    elif info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problem = f"is writable by other users (mode {stat.filemode(info.st_mode)})"
    else:
        return
    raise UnsafeTempDirError(
        f"refusing to use {path} as {what}: it {problem}. Another user could read the "
        "cluster's password there or plant files in it. Remove it, or choose a directory "
        "only you can write (--temp-dir, init(_temp_dir=...), or TMPDIR)."
    )


def _user_name(uid: int) -> str:
    try:
        return f"user {pwd.getpwuid(uid).pw_name!r} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def new_session_dir(temp_dir: str | None = None) -> str:
    """A new directory (mode 0700) for one node's logs and spilled objects, under the temp
    root of temp_dir (see `trusted_root`, whose errors it raises)."""
    root = trusted_root(temp_dir)
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    return tempfile.mkdtemp(prefix=f"session_{stamp}_{os.getpid()}_", dir=root)


def _private_subdir(parent: str, name: str) -> str:
    """parent/name as a new directory (mode 0700), or the one there if it is private."""
    path = os.path.join(parent, name)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        check_private_dir(path, "a session directory")
    return path


def check_node_ip(ip: str) -> str:
    """ip, if it can be a node's address: one that other processes and machines connect to.

    ValueError otherwise. 0.0.0.0 (or ::) is refused: it names no machine, so printed or
    recorded as the node's address it would send every peer nowhere."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        raise ValueError(f"{ip!r} is not an IP address") from None
    if address.is_unspecified:
        guess = guess_node_ip()
        hint = f" (this machine's seems to be {guess})" if guess else ""
        raise ValueError(
            f"{ip} means every interface, not an address other machines can reach: give "
            f"the IP address of this machine that the other nodes use{hint}. redray listens "
            "on that address."
        )
    return ip


def guess_node_ip() -> str | None:
    """This machine's address on the route to the outside (None when there is none)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("192.0.2.1", 9))  # (a documentation address: nothing is sent)
            ip = sock.getsockname()[0]
    except OSError:
        return None
    return None if ip.startswith("127.") or ip == "0.0.0.0" else ip


@dataclass
class StartedNode:
    """A raylet process we started and what it reported about itself."""

    process: subprocess.Popen
    info: dict[str, Any]
    session_dir: str
    redis: RedisServer | None = None  # the head's own Redis, started with it

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the node and wait until it (and with it every worker) is gone."""
        if self.process.poll() is None:
            try:
                self.process.terminate()
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass


def start_node(
    *,
    head: bool,
    token: bytes,
    cluster: str,
    resources: dict[str, float],
    object_store_memory: int,
    node_ip_address: str = "127.0.0.1",
    gcs_url: str | None = None,
    redis_port: int = 0,
    redis_password: str | None = None,
    port: int = 0,
    session_dir: str | None = None,
    private: bool = False,
    node_id: str | None = None,
    timeout: float = 30.0,
    node_timeout: float | None = None,
    command_prefix: tuple[str, ...] = (),
    while_starting: Any = None,
) -> StartedNode:
    """Start a raylet (and, on a head without `gcs_url`, its Redis); wait until it is ready.

    private=True ties the node to this process: it exits when our end of its stdin closes
    (its Redis, a child of the raylet, goes with it). Otherwise it runs in its own session
    and outlives us (as `redray start` wants), and so does a head's Redis, started here.
    command_prefix wraps the raylet's command (e.g. `ip netns exec NS` to run it elsewhere).
    while_starting() is called while the node boots (e.g. to import what the caller needs).
    """
    session_dir = session_dir or new_session_dir()
    logs = _private_subdir(session_dir, "logs")
    redis_server = None
    if head and gcs_url is None and not private:
        redis_server = start_head_redis(node_ip_address, redis_port, redis_password, session_dir)
        gcs_url = redis_server.url
    config = {
        "node_id": node_id or os.urandom(16).hex(),
        "token": token.hex(),
        "cluster": cluster,
        "head": head,
        "gcs_url": gcs_url,
        "start_redis": head and gcs_url is None,
        "redis_port": redis_port,
        "redis_password": redis_password,
        "node_ip_address": node_ip_address,
        "port": port,
        "resources": resources,
        "object_store_memory": object_store_memory,
        "session_dir": session_dir,
        "spill_dir": os.path.join(session_dir, "spill"),
        "node_timeout": node_timeout or DEFAULT_NODE_TIMEOUT,
        "watch_stdin": private,
    }
    log_file = os.open(
        os.path.join(logs, "raylet.log"), os.O_WRONLY | os.O_APPEND | _NEW_FILE, 0o600
    )
    # A detached node outlives us, so its stdout (inherited by its workers) must not be a
    # pipe we close: it goes to a file, from which we read the ready line.
    out_path = os.path.join(logs, "raylet.out")
    try:
        stdout = subprocess.PIPE if private else os.open(out_path, os.O_WRONLY | _NEW_FILE, 0o600)
    except BaseException:
        os.close(log_file)
        raise
    try:
        process = subprocess.Popen(
            [*command_prefix, sys.executable, "-m", "redray.raylet"],
            stdin=subprocess.PIPE,
            stdout=stdout,
            stderr=log_file,
            start_new_session=not private,
            close_fds=True,
        )
    finally:
        os.close(log_file)
        if not private:
            os.close(stdout)
    process.stdin.write((json.dumps(config) + "\n").encode())
    process.stdin.flush()
    if not private:
        process.stdin.close()
    if while_starting is not None:
        while_starting()
    line = _read_line(process, timeout) if private else _read_file_line(process, out_path, timeout)
    if not line:
        process.kill()
        process.wait()
        if redis_server is not None:
            redis_server.stop()
        raise RuntimeError(
            "The raylet failed to start; see " + os.path.join(session_dir, "logs", "raylet.log")
        )
    info = json.loads(line)
    return StartedNode(process, info, session_dir, redis_server)


def start_head_redis(host: str, port: int, password: str | None, session_dir: str) -> RedisServer:
    """The Redis of a head started by `redray start`: in its own session (it outlives the
    raylet), its AOF in the session's `redis` directory, its log in `logs/redis.log`; ready
    when returned. RuntimeError if it does not start."""
    server = RedisServer.start(
        host=host,
        port=port,
        password=password,
        directory=os.path.join(session_dir, "redis"),
        die_with_parent=False,
        persistent=True,
        log_file=os.path.join(session_dir, "logs", "redis.log"),
    )
    try:
        server.wait_ready()
    except (RuntimeError, TimeoutError) as exc:
        server.stop()
        raise RuntimeError(f"The cluster's Redis did not start: {exc}") from None
    return server


def _read_line(process: subprocess.Popen, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    fd = process.stdout.fileno()
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return b""
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                return b""
            data += chunk
    return data.split(b"\n", 1)[0]


def _read_file_line(process: subprocess.Popen, path: str, timeout: float) -> bytes:
    """The first line a detached node writes to its stdout file (b"" if it exits first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path, "rb") as f:
            data = f.read()
        if b"\n" in data:
            return data.split(b"\n", 1)[0]
        if process.poll() is not None:
            return b""
        time.sleep(0.005)
    return b""


def remove_session_dir(session_dir: str) -> None:
    shutil.rmtree(session_dir, ignore_errors=True)


# -- the cluster `redray start` runs on this machine ----------------------------------------
def write_current_cluster(info: dict[str, Any]) -> None:
    """Record the cluster (mode 0600: it holds the Redis password), replacing the record."""
    fd, tmp = tempfile.mkstemp(prefix="current_cluster.", suffix=".tmp", dir=trusted_root())
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        os.replace(tmp, CURRENT_CLUSTER)
    except BaseException:
        os.unlink(tmp)
        raise


def read_record() -> dict[str, Any] | None:
    """The current-cluster file as written, even when its nodes are gone (None if absent
    or unreadable). UnsafeTempDirError when ROOT_DIR or the file could have been written by
    another user: what it says is not to be trusted."""
    try:
        check_private_dir(ROOT_DIR, "redray's temp dir")
        fd = os.open(CURRENT_CLUSTER, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    except UnsafeTempDirError:
        raise
    except OSError:  # (ELOOP: a symbolic link, which we never write)
        return None
    with os.fdopen(fd) as f:
        info = os.fstat(f.fileno())
        if info.st_uid != os.geteuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise UnsafeTempDirError(
                f"refusing to read {CURRENT_CLUSTER}: it belongs to {_user_name(info.st_uid)} "
                f"or others may write it (mode {stat.filemode(info.st_mode)}). Remove it."
            )
        try:
            record = json.load(f)
        except ValueError:
            return None
    return record if isinstance(record, dict) else None


def read_current_cluster() -> dict[str, Any] | None:
    """The recorded cluster while one of its nodes runs, else None (see `read_record`)."""
    info = read_record()
    if info is None:
        return None
    pids = info.get("pids", [])
    if pids and not any(psutil.pid_exists(pid) for pid in pids):
        return None
    return info


def clear_current_cluster() -> None:
    try:
        os.unlink(CURRENT_CLUSTER)
    except FileNotFoundError:
        pass
