"""Starting worker processes fast: a fork server ("zygote") with the runtime already imported.

The raylet forks the zygote before it starts any thread. The zygote imports what workers
need once; each new worker is then a `fork()` of it (a few milliseconds, pages shared
copy-on-write) instead of a fresh interpreter that imports everything again. Every process
in the chain dies with its parent (PR_SET_PDEATHSIG), so a killed raylet leaves no workers.
"""

from __future__ import annotations

import ctypes
import gc
import os
import pickle
import random
import select
import signal
import socket
import sys
from typing import Any

from redray.transport import protocol

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent exits (Linux only)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass


def start_zygote(
    worker_config: dict[str, Any], close_fds: list[int] = ()
) -> tuple[int, socket.socket]:
    """Fork the zygote; returns its pid and the raylet's end of the command socket."""
    parent_sock, child_sock = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        parent_sock.close()
        for fd in close_fds:
            os.close(fd)
        try:
            _zygote_main(child_sock, worker_config)
        finally:
            os._exit(0)
    child_sock.close()
    return pid, parent_sock


def _frames(buf: bytearray) -> list[Any]:
    """Complete frames at the start of buf (consumed from it); FrameTooLargeError for a
    length above MAX_FRAME (the stream from the raylet is corrupt)."""
    header = protocol.HEADER.size
    messages = []
    while len(buf) >= header:
        (length,) = protocol.HEADER.unpack_from(buf)
        if length > protocol.MAX_FRAME:
            raise protocol.FrameTooLargeError(length, "the raylet")
        if len(buf) < header + length:
            break
        messages.append(pickle.loads(bytes(buf[header : header + length])))
        del buf[: header + length]
    return messages


def _zygote_main(sock: socket.socket, worker_config: dict[str, Any]) -> None:
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import redray.core.executor  # noqa: F401 - imported once here, shared by every fork
    import redray.worker  # noqa: F401
    import redray.worker_main  # noqa: F401

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    buf = bytearray()
    warmed = False
    while True:
        ready, _, _ = select.select([sock, wake_r], [], [], None if warmed else 0.2)
        if not ready and not warmed:
            warmed = True
            _warm_up()
            continue
        if wake_r in ready:
            os.read(wake_r, 4096)
            _reap(sock)
        if sock in ready:
            chunk = sock.recv(65536)
            if not chunk:
                return
            buf += chunk
            try:
                messages = _frames(buf)
            except protocol.FrameTooLargeError as exc:
                print(f"redray fork server: {exc}", file=sys.stderr, flush=True)
                return  # the stream is unusable: the raylet sees the fork server gone
            for message in messages:
                if message[0] == "spawn":
                    _, worker_id, env_vars, raylet_address, prepared = message
                    config = {**worker_config, "raylet_address": raylet_address}
                    pid = _fork_worker(sock, wake_r, wake_w, config, worker_id, env_vars, prepared)
                    sock.sendall(protocol.encode(("spawned", worker_id, pid)))


def _warm_up() -> None:
    """Import what many workers will need, while nobody is waiting for a fork.

    redis is imported here because every worker talks to Redis: imported once in the fork
    server, its pages are shared by every worker instead of copied into each. numpy is left
    out on purpose: it would add ~20 MB to every idle process of the node, and a worker
    imports it the first time it needs it."""
    import redis  # noqa: F401

    import redray.core.actor_runtime  # noqa: F401
    import redray.util.placement_group  # noqa: F401


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        sock.sendall(protocol.encode(("exited", pid, status)))


def _fork_worker(
    sock, wake_r, wake_w, config, worker_id: bytes, env_vars: dict, prepared: Any = None
) -> int:
    """A new worker: a fork of this process, in the runtime env `prepared` describes (a
    `redray.runtime_env.node.Prepared`, or None); one whose env has its own interpreter (a
    virtualenv) execs it, reading its configuration from an inherited pipe."""
    gc.freeze()  # the child's collections never write to the objects it shares with us
    pid = os.fork()
    if pid != 0:
        return pid
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for fd in (wake_r, wake_w):
            os.close(fd)
        sock.close()
        die_with_parent()
        os.environ.update({k: str(v) for k, v in env_vars.items()})
        _log_to_files(config.get("log_dir"), worker_id)
        if prepared is not None:
            _enter_env(prepared, {**config, "worker_id": worker_id})
        random.seed()
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()
        from redray import worker_main

        worker_main.main({**config, "worker_id": worker_id})
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        os._exit(1)


def _enter_env(prepared: Any, config: dict) -> None:
    """Move this new worker into its runtime env: its working_dir as cwd, its paths first on
    sys.path, or (a virtualenv) exec that interpreter, which never returns."""
    os.environ.update(prepared.environ(dict(os.environ)))
    if prepared.cwd:
        os.chdir(prepared.cwd)
    if prepared.python:
        read_end, write_end = os.pipe()
        os.write(write_end, pickle.dumps(config))  # a few KB: fits the pipe's buffer
        os.close(write_end)
        os.set_inheritable(read_end, True)
        argv = [prepared.python, "-m", "redray.worker_main", "--config-fd", str(read_end)]
        os.execv(prepared.python, argv)
    sys.path[:0] = [p for p in prepared.paths if p not in sys.path]


def _log_to_files(log_dir: str | None, worker_id: bytes) -> None:
    """Point this worker's stdout and stderr at its own files in the node's log directory
    (`worker-<id>-<pid>.out/.err`, Ray's names), where `redray logs` finds them."""
    if not log_dir:
        return
    stem = os.path.join(log_dir, f"worker-{worker_id.hex()}-{os.getpid()}")
    for fd, suffix in ((1, "out"), (2, "err")):
        try:
            target = os.open(f"{stem}.{suffix}", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError:
            continue
        os.dup2(target, fd)
        os.close(target)
