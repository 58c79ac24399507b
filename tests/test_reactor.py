"""The reactor: a thread blocked for a reply runs the loop itself, and leaves it to the I/O
thread when it is done (see redray/reactor.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest
from conftest import REPO, wait_for

from redray import exceptions
from redray.transport import protocol
from redray.transport.reactor import LoopBlockedError, Reactor, ReactorStoppedError

TOKEN = b"t" * 32


class Echo:
    """A reactor with a listener that records which thread handled each message."""

    def __init__(self):
        self.reactor = Reactor(TOKEN, name="test-reactor")
        self.handled: list[tuple[object, int]] = []
        self.waiters: dict[object, object] = {}
        self.address = self.reactor.listen("127.0.0.1", 0, self.on_message)

    def on_message(self, conn, message):
        self.handled.append((message, threading.get_ident()))
        waiter = self.waiters.pop(message, None)
        if waiter is not None:
            waiter.set()

    def client(self):
        return protocol.connect(self.address, TOKEN)


@pytest.fixture
def echo():
    e = Echo()
    yield e
    e.reactor.stop()


def blocked_in(reactor: Reactor, waiter, timeout=None) -> tuple[threading.Thread, dict]:
    """Run reactor.block(waiter) on a new thread; the dict gets its result (or its error)."""
    result: dict = {}

    def run() -> None:
        result["ident"] = threading.get_ident()
        try:
            result["returned"] = reactor.block(waiter, timeout)
        except Exception as exc:
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def test_a_blocked_thread_handles_the_message_it_waits_for(echo):
    waiter = echo.waiters["reply"] = echo.reactor.waiter()
    thread, result = blocked_in(echo.reactor, waiter)
    # The blocked thread asks for the loop; once it runs it, the reply is handled there.
    wait_for(lambda: echo.reactor._leader == result.get("ident"), message="loop never lent")
    sock = echo.client()
    sock.sendall(protocol.encode("reply"))
    thread.join(10)
    assert result["returned"] is True
    assert echo.handled == [("reply", result["ident"])]
    sock.close()


def test_block_times_out_and_the_loop_goes_on(echo):
    waiter = echo.reactor.waiter()
    thread, result = blocked_in(echo.reactor, waiter, timeout=0.2)
    thread.join(10)
    assert result["returned"] is False
    # Nobody blocks now: the I/O thread takes the loop back and handles what comes.
    sock = echo.client()
    sock.sendall(protocol.encode("later"))
    wait_for(lambda: [m for m, _ in echo.handled] == ["later"], message="message never handled")
    assert echo.handled[0][1] == echo.reactor.thread.ident
    sock.close()


def test_a_loop_left_free_is_taken_back_by_the_io_thread(echo):
    """After a borrower is done it leaves the loop free; messages that arrive while it runs
    other code are still handled (by the I/O thread, which takes the loop back)."""
    sock = echo.client()
    waiter = echo.waiters["first"] = echo.reactor.waiter()
    thread, result = blocked_in(echo.reactor, waiter)
    wait_for(lambda: echo.reactor._leader == result.get("ident"), message="loop never lent")
    sock.sendall(protocol.encode("first"))
    thread.join(10)
    assert result["returned"] is True
    sock.sendall(protocol.encode("second"))
    wait_for(lambda: len(echo.handled) == 2, message="second message never handled")
    assert echo.handled[1] == ("second", echo.reactor.thread.ident)
    sock.close()


def test_a_thread_running_the_loop_is_woken_by_a_set_from_elsewhere(echo):
    """A waiter set by another thread (a pub/sub message, a user thread) wakes its thread
    even while that thread sleeps inside the loop with no socket activity."""
    waiter = echo.reactor.waiter()
    thread, result = blocked_in(echo.reactor, waiter, timeout=60)
    wait_for(lambda: echo.reactor._leader == result.get("ident"), message="loop never lent")
    wchan = f"/proc/self/task/{thread.native_id}/wchan"
    if os.path.exists(wchan):  # until it is asleep in the loop's epoll_wait
        wait_for(lambda: "epoll" in open(wchan).read(), message="never slept in the loop")
    waiter.set()
    thread.join(5)
    assert not thread.is_alive(), "the blocked thread slept on until its timeout"
    assert result["returned"] is True


def test_set_before_block_returns_at_once(echo):
    waiter = echo.reactor.waiter()
    waiter.set()
    waiter.set()  # a second set is harmless
    assert echo.reactor.block(waiter, timeout=5) is True


def test_two_blocked_threads_are_both_woken(echo):
    """One thread runs the loop; the other sleeps and is woken by the handler that the
    first thread runs."""
    first = echo.waiters["a"] = echo.reactor.waiter()
    second = echo.waiters["b"] = echo.reactor.waiter()
    t1, r1 = blocked_in(echo.reactor, first)
    t2, r2 = blocked_in(echo.reactor, second)
    sock = echo.client()
    sock.sendall(protocol.encode("b"))
    t2.join(10)
    sock.sendall(protocol.encode("a"))
    t1.join(10)
    assert r1["returned"] is True and r2["returned"] is True
    assert sorted(m for m, _ in echo.handled) == ["a", "b"]
    sock.close()


@pytest.mark.timeout(30)
def test_stop_while_a_thread_runs_the_loop(echo):
    """The I/O thread ends, and the thread that ran the loop learns at once that nothing it
    waits for can come any more."""
    waiter = echo.reactor.waiter()
    thread, result = blocked_in(echo.reactor, waiter)
    wait_for(lambda: echo.reactor._leader == result.get("ident"), message="loop never lent")
    echo.reactor.stop("stopped by the test")
    echo.reactor.thread.join(10)
    assert not echo.reactor.thread.is_alive()
    thread.join(10)
    assert not thread.is_alive()
    assert isinstance(result["error"], ReactorStoppedError)
    assert isinstance(result["error"], exceptions.RaySystemError)
    assert "stopped by the test" in str(result["error"])


@pytest.mark.timeout(30)
def test_stop_wakes_every_sleeping_thread_with_an_error(echo):
    waiters = [echo.reactor.waiter() for _ in range(3)]
    blocked = [blocked_in(echo.reactor, w) for w in waiters]
    # One of them runs the loop; the others sleep.
    wait_for(lambda: len(echo.reactor._sleepers) >= 2, message="threads never slept")
    echo.reactor.stop()
    for thread, result in blocked:
        thread.join(10)
        assert not thread.is_alive()
        assert isinstance(result["error"], ReactorStoppedError)
    # A wait that starts after the stop fails at once too.
    with pytest.raises(ReactorStoppedError):
        echo.reactor.block(echo.reactor.waiter(), timeout=10)


@pytest.mark.timeout(30)
def test_blocking_on_the_thread_running_the_loop_raises(echo):
    """A handler that blocks for a reply only its own thread could read fails clearly
    instead of wedging the process."""
    errors: list = []
    replied = echo.reactor.waiter()

    def handler(conn, message):
        try:
            echo.reactor.block(echo.reactor.waiter(), timeout=5)
        except LoopBlockedError as exc:
            errors.append(exc)
        replied.set()

    address = echo.reactor.listen("127.0.0.1", 0, handler)
    sock = protocol.connect(address, TOKEN)
    sock.sendall(protocol.encode("block"))
    assert echo.reactor.block(replied, timeout=10)
    assert len(errors) == 1 and "I/O loop" in str(errors[0])
    # The loop is not wedged: other messages are still handled.
    done = echo.reactor.waiter()
    echo.waiters["after"] = done
    client = echo.client()
    client.sendall(protocol.encode("after"))
    assert echo.reactor.block(done, timeout=10)
    sock.close()
    client.close()


@pytest.mark.timeout(30)
def test_stop_closes_every_descriptor(echo):
    """A reactor leaves no file descriptor behind: its sockets, listeners, selector and
    pipe, and a connection handed to it after it stopped (refused with ConnectionError)."""
    before = set(os.listdir("/proc/self/fd"))
    reactor = Reactor(TOKEN, name="test-reactor")
    reactor.listen("127.0.0.1", 0, lambda conn, message: None)
    conn = reactor.connect(echo.address, lambda conn, message: None)
    wait_for(lambda: conn.fileno in reactor._connections, message="never registered")
    reactor.stop()
    assert not reactor.thread.is_alive() and conn.closed
    with pytest.raises(ConnectionError):
        reactor.connect(echo.address, lambda conn, message: None)
    # (the echo server's ends of those connections close once it reads their EOF)
    wait_for(lambda: set(os.listdir("/proc/self/fd")) - before == set(), timeout=5)


@pytest.mark.timeout(30)
def test_a_loop_lent_as_its_borrower_is_woken_is_handed_back():
    """The I/O thread may lend the loop to a blocked thread just as that thread's waiter is
    set (the interleaving below, step by step): the thread must still take the loop and
    leave it free, or nobody runs it and its next call finds itself marked as running it."""
    reactor = Reactor(TOKEN, name="test-lend-race")
    try:
        waiter = reactor.waiter()
        assert not reactor._take_or_ask(waiter)  # the loop is the I/O thread's: ask for it
        wait_for(lambda: waiter.leading, timeout=5)  # ...and it is lent
        waiter.set()  # the reply arrives before the blocked thread went to sleep
        assert reactor._sleep(waiter, None)  # it must lead, to hand the loop back
        reactor._leave(waiter)
        # The loop runs again, and the same thread can block once more.
        served = threading.Event()
        reactor.call_soon(served.set)
        assert served.wait(5)
        again = reactor.waiter()
        reactor.call_soon(again.set)
        assert reactor.block(again, timeout=5)
    finally:
        reactor.stop()


OUT_OF_FILES_LISTENER = """
import resource, sys
from redray.transport import protocol
from redray.transport.reactor import Reactor

resource.setrlimit(resource.RLIMIT_NOFILE, (48, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
reactor = Reactor(b"t" * 32, name="out-of-files")
host, port = reactor.listen("127.0.0.1", 0, lambda conn, message: conn.send(("echo", message)))
print(port, flush=True)
sys.stdin.read()
"""


def test_a_listener_out_of_descriptors_pauses_instead_of_spinning():
    """With every descriptor in use, accept fails while the listener stays readable: the
    loop pauses accepting (leaving the backlog to the kernel) instead of spinning on it, and
    accepts again once descriptors are free."""
    server = subprocess.Popen(
        [sys.executable, "-c", OUT_OF_FILES_LISTENER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    flood = []
    try:
        port = int(server.stdout.readline())
        proc = psutil.Process(server.pid)
        flood = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(80)]
        wait_for(lambda: proc.num_fds() >= 47, timeout=5)
        cpu = sum(proc.cpu_times()[:2])
        spent = 1.0
        time.sleep(spent)  # (an absence: only seen by looking for a while)
        busy = sum(proc.cpu_times()[:2]) - cpu
        assert busy < 0.3 * spent, f"the listener spun: {busy:.2f} s of CPU in {spent} s"
        for sock in flood:
            sock.close()
        good = protocol.connect(("127.0.0.1", port), TOKEN, local=False)
        good.sendall(protocol.encode("ping"))
        good.settimeout(5)
        assert protocol.recv_frame(good) == ("echo", "ping")
        good.close()
    finally:
        for sock in flood:
            sock.close()
        server.stdin.close()
        server.wait(10)
