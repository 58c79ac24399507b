"""Abuse of redray's TCP listeners by peers without the cluster token.

Every listener of a node (the raylet's, its object manager's, the control loop's, and each
worker's) is found the way an attacker on the machine would: the listening TCP sockets of
the raylet and worker processes. Whatever a peer without the token sends, nothing is
unpickled and the node stays up; a connection that does not prove it holds the token is
closed after the handshake deadline; a flood of idle connections (20,000, from another
process) holds a bounded number of the node's file descriptors and threads, and real
drivers connect and run tasks while it goes on.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import resource
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import REPO, wait_for

import redray
from redray.gcs import Gcs
from redray.transport import protocol
from redray.transport.admission import MAX_UNAUTHENTICATED

pytestmark = pytest.mark.timeout(60)

NONCE_BYTES = 32  # the server's challenge: the first bytes any listener sends
PROOF_BYTES = 64  # what the client must answer (HMAC + its own nonce)
DEADLINE = protocol.HANDSHAKE_TIMEOUT
SLACK = 5.0  # for a loaded machine
FLOOD_CONNECTIONS = 20_000


@redray.remote
def add(a: int, b: int) -> int:
    return a + b


@redray.remote
class Pid:
    def pid(self) -> int:
        return os.getpid()


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def listening_ports(proc: psutil.Process) -> list[int]:
    return sorted(
        c.laddr.port
        for c in proc.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr
    )


def node_raylet() -> psutil.Process:
    """The raylet of the private cluster this process started."""
    (raylet,) = [
        child
        for child in psutil.Process().children()
        if "redray.raylet" in child.cmdline() and "-m" in child.cmdline()
    ]
    return raylet


def object_manager_address(ray_start) -> tuple[str, int]:
    """Where the node's object manager listens, as the node table has it."""
    (node,) = Gcs(ray_start["address"]).nodes()
    host, port = node["object_manager_address"]
    return host, port


@pytest.fixture
def listeners(ray_start) -> Iterator[dict[str, tuple[str, int]]]:
    """{name: (host, port)} of every TCP listener of the node and of one worker."""
    node = redray.nodes()[0]
    host, main_port = node["NodeManagerAddress"], node["NodeManagerPort"]
    found = {"raylet": (host, main_port), "object manager": object_manager_address(ray_start)}
    for port in listening_ports(node_raylet()):
        if (host, port) not in found.values():
            found[f"raylet-other-{port}"] = (host, port)  # the control loop's
    actor = Pid.remote()
    worker = psutil.Process(redray.get(actor.pid.remote(), timeout=30))
    (worker_port,) = listening_ports(worker)
    found["worker"] = (host, worker_port)
    assert len(found) == 4, found
    yield found
    redray.kill(actor)


def node_is_healthy(raylet: psutil.Process) -> None:
    assert alive(raylet), "the raylet died"
    assert redray.get(add.remote(1, 2), timeout=30) == 3


def read_challenge(sock: socket.socket) -> bytes:
    sock.settimeout(5)
    nonce = b""
    while len(nonce) < NONCE_BYTES:
        chunk = sock.recv(NONCE_BYTES - len(nonce))
        assert chunk, "the listener closed before sending its challenge"
        nonce += chunk
    return nonce


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """Whether the server closes the connection within timeout (what it sends is drained)."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        sock.settimeout(remaining)
        try:
            if not sock.recv(65536):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False


def send_ignoring_close(sock: socket.socket, data: bytes) -> None:
    """Send data; a server that hangs up half-way is what the tests expect."""
    sock.settimeout(5)
    with contextlib.suppress(ConnectionResetError, BrokenPipeError):
        sock.sendall(data)


class CreatesFile:
    """Unpickling this creates the file at path: proof that a listener unpickled it."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def frame(message: object) -> bytes:
    payload = pickle.dumps(message, protocol=5)
    return struct.pack("<I", len(payload)) + payload


def test_garbage_bytes_are_dropped_and_the_node_stays_up(listeners) -> None:
    raylet = node_raylet()
    garbage = os.urandom(1 << 20)
    for name, address in listeners.items():
        with socket.create_connection(address, timeout=5) as sock:
            read_challenge(sock)
            send_ignoring_close(sock, garbage)
            assert closed_by_server(sock, 5), f"{name} kept a connection that sent garbage"
    node_is_healthy(raylet)


def test_oversized_frame_header_is_dropped_without_allocating(listeners) -> None:
    raylet = node_raylet()
    rss_before = raylet.memory_info().rss
    for name, address in listeners.items():
        with socket.create_connection(address, timeout=5) as sock:
            read_challenge(sock)
            # A frame header announcing 2 GiB where the handshake's proof should be.
            send_ignoring_close(sock, struct.pack("<I", 2**31 - 1) + b"\0" * (1 << 16))
            assert closed_by_server(sock, 5), f"{name} kept a connection with no proof"
    assert raylet.memory_info().rss - rss_before < 64 * 2**20, "the raylet allocated the frame"
    node_is_healthy(raylet)


def test_wrong_hmac_then_a_pickle_is_never_unpickled(listeners, tmp_path: Path) -> None:
    raylet = node_raylet()
    planted: list[Path] = []
    for name, address in listeners.items():
        # A wrong proof followed by a frame, and a frame with no proof at all.
        for attempt, preamble in (("wrong-hmac", os.urandom(PROOF_BYTES)), ("no-proof", b"")):
            path = tmp_path / f"unpickled-by-{name}-{attempt}"
            planted.append(path)
            with socket.create_connection(address, timeout=5) as sock:
                read_challenge(sock)
                send_ignoring_close(sock, preamble + frame(CreatesFile(str(path))) * 4)
                assert closed_by_server(sock, 5), f"{name} kept an unauthenticated peer"
    node_is_healthy(raylet)  # (a round trip through the raylet: it read what we sent)
    assert not [p.name for p in planted if p.exists()], "unpickled from a peer without the token"


@pytest.mark.timeout(DEADLINE + SLACK + 30)
def test_idle_unauthenticated_connections_are_closed_by_the_handshake_deadline(
    listeners,
) -> None:
    socks = {
        name: socket.create_connection(address, timeout=5) for name, address in listeners.items()
    }
    try:
        for sock in socks.values():
            read_challenge(sock)
        opened = time.monotonic()
        closed_after: dict[str, float] = {}

        def all_closed() -> bool:
            for name in set(socks) - set(closed_after):
                if closed_by_server(socks[name], 0.01):
                    closed_after[name] = time.monotonic() - opened
            return len(closed_after) == len(socks)

        wait_for(
            all_closed,
            DEADLINE + SLACK,
            message=f"idle connections still open after {DEADLINE + SLACK} s: "
            f"{sorted(set(socks) - set(closed_after))}",
        )
        early = {name: t for name, t in closed_after.items() if t < DEADLINE / 2}
        assert not early, f"closed long before the {DEADLINE} s deadline: {early}"
    finally:
        for sock in socks.values():
            sock.close()
    node_is_healthy(node_raylet())


FLOODER = r"""
import collections, json, resource, select, socket, sys, time

host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
want = count + 1024
if soft < want:
    try:  # (root may raise the hard limit too)
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

BATCH, PATIENCE = 500, 5.0


def open_batch(n):
    batch = {}
    for _ in range(n):
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.connect((host, port))
        except BlockingIOError:
            pass
        except OSError:
            sock.close()
            continue
        batch[sock.fileno()] = sock
    return batch


def answered(batch, patience):
    # A connection counts once the listening process itself took it: it sent its
    # challenge or closed (the kernel alone would complete the TCP handshake, then wait).
    poller = select.poll()
    for fd in batch:
        poller.register(fd, select.POLLIN)
    waiting = set(batch)
    deadline = time.monotonic() + patience
    while waiting and time.monotonic() < deadline:
        for fd, _ in poller.poll(100):
            poller.unregister(fd)
            waiting.discard(fd)
    return len(batch) - len(waiting)


# Phase 1: `count` idle connections, every one of them held open.
held, accepted, started = [], 0, time.monotonic()
while len(held) < count:
    batch = open_batch(min(BATCH, count - len(held)))
    got = answered(batch, PATIENCE)
    accepted += got
    held += batch.values()
    if got < len(batch):
        break  # the listener stopped taking connections
report = {"opened": len(held), "accepted": accepted, "seconds": time.monotonic() - started}
print(json.dumps(report), flush=True)

# Phase 2, until stdin closes: keep opening new idle connections (the newest few hundred
# held open), as an attacker keeping the listener's table of waiting connections full.
recent = collections.deque()
while not select.select([sys.stdin], [], [], 0)[0]:
    batch = open_batch(32)
    answered(batch, 0.05)
    recent.extend(batch.values())
    while len(recent) > 2 * 256:
        recent.popleft().close()
"""


class Flood:
    """Processes holding `count` idle connections to address, then flooding on."""

    def __init__(self, address: tuple[str, int], count: int):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        per_process = count if hard == resource.RLIM_INFINITY else max(1000, hard - 1024)
        processes = math.ceil(count / per_process)
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-c", FLOODER, address[0], str(address[1])]
                + [str(min(per_process, count - i * per_process))],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in range(processes)
        ]

    def held(self) -> dict[str, float]:
        """Wait for every process to have opened its share; their summed reports."""
        total: dict[str, float] = {"opened": 0, "accepted": 0, "seconds": 0}
        for proc in self.procs:
            report = json.loads(proc.stdout.readline() or "{}")
            for key in total:
                total[key] = (
                    max(total[key], report.get(key, 0))
                    if key == "seconds"
                    else (total[key] + report.get(key, 0))
                )
        return total

    def stop(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(OSError):
                proc.stdin.close()
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def flood(address: tuple[str, int], count: int) -> Iterator[Flood]:
    running = Flood(address, count)
    try:
        yield running
    finally:
        running.stop()


NEW_DRIVER = """
import sys
import redray

redray.init(address=sys.argv[1])


@redray.remote
def add(a, b):
    return a + b


print(redray.get(add.remote(1, 2), timeout=30))
"""


def run_new_driver(address: str, tmp_path: Path, over_tcp: bool) -> None:
    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONPATH=f"{REPO}:{os.environ['PYTHONPATH']}")
    if over_tcp:
        env["REDRAY_UNIX_SOCKETS"] = "0"  # competes with the flood for the same table
    started = time.monotonic()
    driver = subprocess.run(
        [sys.executable, "-c", NEW_DRIVER, address],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    how = "over TCP" if over_tcp else "over the Unix socket"
    assert driver.returncode == 0 and driver.stdout.strip().endswith("3"), (
        f"during a flood of idle unauthenticated connections a new driver ({how}) failed:\n"
        f"{driver.stdout[-2000:]}\n{driver.stderr[-4000:]}"
    )
    print(f"a new driver connected {how} and ran a task in {time.monotonic() - started:.1f} s")


@pytest.mark.timeout(120)
def test_twenty_thousand_idle_connections_hold_few_fds_and_do_not_lock_out_drivers(
    ray_start, tmp_path: Path
) -> None:
    node = redray.nodes()[0]
    address = (node["NodeManagerAddress"], node["NodeManagerPort"])
    raylet = node_raylet()
    fds_before = raylet.num_fds()
    # Waiting connections (two tables: everyone's, and our own user's local peers), the
    # new drivers' connections and their workers'.
    fd_bound = fds_before + 2 * MAX_UNAUTHENTICATED + 128
    with flood(address, FLOOD_CONNECTIONS) as attack:
        held = attack.held()
        print(f"flood: {held}; the raylet holds {raylet.num_fds()} files ({fds_before} before)")
        assert held["accepted"] >= 1000, f"the flood never got going: {held}"
        assert raylet.num_fds() <= fd_bound
        # While the flood goes on: new drivers connect and run a task, as does this one.
        run_new_driver(ray_start["address"], tmp_path, over_tcp=True)
        run_new_driver(ray_start["address"], tmp_path, over_tcp=False)
        node_is_healthy(raylet)
        assert raylet.num_fds() <= fd_bound
        assert held["accepted"] == FLOOD_CONNECTIONS, f"the raylet stopped accepting: {held}"
    wait_for(
        lambda: raylet.num_fds() <= fds_before + 64,
        DEADLINE + SLACK,
        message="the flood's connections outlived the handshake deadline",
    )


@pytest.mark.timeout(60)
def test_object_manager_threads_stay_bounded_under_a_flood(ray_start) -> None:
    address = object_manager_address(ray_start)
    raylet = node_raylet()
    threads_before = raylet.num_threads()
    with flood(address, 2_000) as attack:
        held = attack.held()
        threads = raylet.num_threads()
        assert threads <= threads_before + 2, (
            f"the object manager runs {threads - threads_before} more threads for "
            f"{held['accepted']} idle connections without the token"
        )
        assert held["accepted"] == held["opened"] == 2_000, f"it stopped accepting: {held}"
        with socket.create_connection(address, timeout=5) as sock:
            read_challenge(sock)  # still serving
    node_is_healthy(raylet)
