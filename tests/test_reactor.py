"""The reactor: a thread blocked for a reply runs the loop itself, and leaves it to the I/O
thread when it is done (see redray/reactor.py)."""

from __future__ import annotations

import os
import threading

import pytest
from conftest import wait_for

from redray import protocol
from redray.reactor import Reactor

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
    """Run reactor.block(waiter) on a new thread; the dict gets its result."""
    result: dict = {}

    def run() -> None:
        result["ident"] = threading.get_ident()
        result["returned"] = reactor.block(waiter, timeout)

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


def test_stop_while_a_thread_runs_the_loop(echo):
    waiter = echo.reactor.waiter()
    thread, result = blocked_in(echo.reactor, waiter, timeout=30)
    wait_for(lambda: echo.reactor._leader == result.get("ident"), message="loop never lent")
    echo.reactor.stop()
    echo.reactor.thread.join(10)
    assert not echo.reactor.thread.is_alive()
    waiter.set()
    thread.join(10)
    assert result["returned"] is True
