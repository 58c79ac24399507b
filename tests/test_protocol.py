"""Frames and the HMAC handshake: socket pairs for the protocol, a real Reactor listener for
the server side as every redray process runs it, and the raylet and worker listeners of a
live cluster attacked by a client without the token."""

from __future__ import annotations

import hmac
import os
import pickle
import socket
import threading
import time

import psutil
import pytest
from conftest import block_until, mark, wait_for

import redray
from redray.node import worker_pool
from redray.transport import admission, protocol
from redray.transport.reactor import Reactor

TOKEN = b"t" * 32
WRONG = b"w" * 32


class FileCreator:
    """A pickle that creates a file when unpickled: what an attacker would send."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def malicious_frame(path: str) -> bytes:
    frame = protocol.encode(FileCreator(path))
    # Longer than a handshake proof, so a server that mistook it for one has read it all.
    assert len(frame) > protocol.CLIENT_PROOF_BYTES
    return frame


def test_malicious_payload_is_live(tmp_path):
    """Control: the payload used below really creates its file when unpickled."""
    target = tmp_path / "pwned"
    frame = malicious_frame(str(target))
    pickle.loads(frame[protocol.HEADER.size :]).close()
    assert target.exists()


def test_encode_is_length_prefixed_pickle():
    frame = protocol.encode(("task", 1, b"x" * 10))
    (length,) = protocol.HEADER.unpack_from(frame)
    assert length == len(frame) - protocol.HEADER.size
    assert pickle.loads(frame[protocol.HEADER.size :]) == ("task", 1, b"x" * 10)


def test_new_token_is_random():
    a, b = protocol.new_token(), protocol.new_token()
    assert len(a) == 32 and a != b


# -- the handshake over a socket pair --------------------------------------------------------
def serve_handshake(sock: socket.socket, token: bytes, result: dict) -> None:
    """The server half, from the protocol's primitives."""
    nonce = protocol.server_challenge()
    sock.sendall(nonce)
    proof = protocol._recv_exactly(sock, protocol.CLIENT_PROOF_BYTES)
    answer = protocol.server_verify(token, nonce, proof)
    result["accepted"] = answer is not None
    if answer is None:
        sock.close()
        return
    sock.sendall(answer)


def handshake_pair(client_token: bytes, server_token: bytes):
    client, server = socket.socketpair()
    result: dict = {}
    thread = threading.Thread(target=serve_handshake, args=(server, server_token, result))
    thread.start()
    try:
        protocol.client_handshake(client, client_token, timeout=5)
        error = None
    except ConnectionError as exc:
        error = exc
    thread.join(5)
    client.close()
    server.close()
    return result, error


def test_handshake_with_the_right_token():
    result, error = handshake_pair(TOKEN, TOKEN)
    assert error is None
    assert result["accepted"] is True


def test_server_refuses_a_client_with_the_wrong_token():
    result, error = handshake_pair(WRONG, TOKEN)
    assert result["accepted"] is False
    assert isinstance(error, ConnectionError)


def test_client_refuses_a_server_without_the_token():
    """Mutual: a listener that does not hold the token cannot pose as a cluster process."""
    client, server = socket.socketpair()

    def impostor():
        server.sendall(os.urandom(protocol.NONCE_BYTES))
        proof = protocol._recv_exactly(server, protocol.CLIENT_PROOF_BYTES)
        client_nonce = proof[protocol.MAC_BYTES :]
        server.sendall(protocol._mac(WRONG, b"server", client_nonce))

    thread = threading.Thread(target=impostor)
    thread.start()
    with pytest.raises(protocol.AuthenticationError):
        protocol.client_handshake(client, TOKEN, timeout=5)
    thread.join(5)
    client.close()
    server.close()


def test_client_does_not_accept_its_own_proof_reflected():
    """A server echoing the client's MAC back must not pass as knowing the token."""
    client, server = socket.socketpair()

    def reflector():
        nonce = os.urandom(protocol.NONCE_BYTES)
        server.sendall(nonce)
        proof = protocol._recv_exactly(server, protocol.CLIENT_PROOF_BYTES)
        server.sendall(proof[: protocol.MAC_BYTES])

    thread = threading.Thread(target=reflector)
    thread.start()
    with pytest.raises(protocol.AuthenticationError):
        protocol.client_handshake(client, TOKEN, timeout=5)
    thread.join(5)
    client.close()
    server.close()


def test_proofs_are_bound_to_the_nonce():
    """A proof recorded for one challenge is useless against the next (no replay)."""
    first, second = protocol.server_challenge(), protocol.server_challenge()
    assert first != second
    proof = protocol._mac(TOKEN, b"client", first) + os.urandom(protocol.NONCE_BYTES)
    assert protocol.server_verify(TOKEN, first, proof) is not None
    assert protocol.server_verify(TOKEN, second, proof) is None
    assert protocol.server_verify(WRONG, first, proof) is None


def test_server_answer_proves_the_token():
    nonce = protocol.server_challenge()
    client_nonce = os.urandom(protocol.NONCE_BYTES)
    proof = protocol._mac(TOKEN, b"client", nonce) + client_nonce
    answer = protocol.server_verify(TOKEN, nonce, proof)
    assert hmac.compare_digest(answer, protocol._mac(TOKEN, b"server", client_nonce))


def test_client_handshake_times_out_on_a_silent_server():
    """A silent server is a timeout, not a token problem (a redray listener never stays
    silent over a wrong token: it answers REJECTED)."""
    client, server = socket.socketpair()
    with pytest.raises(ConnectionError, match="did not complete the handshake") as error:
        protocol.client_handshake(client, TOKEN, timeout=0.2, listener="10.0.0.1:7")
    assert not isinstance(error.value, protocol.AuthenticationError)
    assert "10.0.0.1:7" in str(error.value)
    client.close()
    server.close()


def test_client_handshake_fails_when_server_hangs_up():
    client, server = socket.socketpair()
    server.close()
    with pytest.raises(ConnectionError, match="closed the connection before the handshake"):
        protocol.client_handshake(client, TOKEN, timeout=5)
    client.close()


# -- a real listener (the Reactor every redray process runs) ---------------------------------
class Listener:
    def __init__(self):
        self.reactor = Reactor(TOKEN, name="test-listener")
        self.messages: list = []
        self.closed = threading.Event()
        self.address = self.reactor.listen(
            "127.0.0.1", 0, self.on_message, lambda conn: self.closed.set()
        )

    def on_message(self, conn, message):
        self.messages.append(message)
        conn.send(("echo", message))


@pytest.fixture
def listener():
    lst = Listener()
    yield lst
    lst.reactor.stop()


def raw_connection(address: tuple[str, int], transport: str) -> socket.socket:
    """A plain socket to a listener, over TCP or its abstract Unix socket (no handshake)."""
    if transport == "tcp":
        return socket.create_connection(address, timeout=5)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(protocol.local_name(*address))
    return sock


TRANSPORTS = pytest.mark.parametrize("transport", ["tcp", "unix"])


def read_frame(sock: socket.socket):
    header = protocol._recv_exactly(sock, protocol.HEADER.size)
    (length,) = protocol.HEADER.unpack(header)
    return pickle.loads(protocol._recv_exactly(sock, length))


def wait_closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> None:
    """Read until the server hangs up (EOF or reset)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass


def test_listener_serves_an_authenticated_client(listener):
    sock = protocol.connect(listener.address, TOKEN)
    sock.sendall(protocol.encode(("ping", 1)))
    assert read_frame(sock) == ("echo", ("ping", 1))
    assert listener.messages == [("ping", 1)]
    sock.close()


def test_listener_drops_a_client_with_the_wrong_token(listener):
    """The client hears that its token was refused (not that the listener hung up)."""
    with pytest.raises(protocol.AuthenticationError, match="refused our cluster token"):
        protocol.connect(listener.address, WRONG)
    with pytest.raises(protocol.AuthenticationError, match="refused our cluster token"):
        protocol.connect(listener.address, WRONG, local=False)
    assert listener.messages == []


def test_a_frame_longer_than_max_frame_closes_the_connection(listener):
    """An authenticated peer announcing more than MAX_FRAME bytes is dropped at the header,
    before any of it is buffered; the listener goes on serving others."""
    sock = protocol.connect(listener.address, TOKEN)
    sock.sendall(protocol.HEADER.pack(protocol.MAX_FRAME + 1) + b"\0" * 4096)
    wait_closed_by_peer(sock)
    sock.close()
    assert listener.closed.wait(5) and listener.messages == []
    good = protocol.connect(listener.address, TOKEN)
    good.sendall(protocol.encode(("still", "here")))
    assert read_frame(good) == ("echo", ("still", "here"))
    good.close()


def test_recv_frame_refuses_a_length_above_max_frame():
    a, b = socket.socketpair()
    a.sendall(protocol.HEADER.pack(protocol.MAX_FRAME + 1) + b"x" * 16)
    with pytest.raises(protocol.FrameTooLargeError, match="exceeds MAX_FRAME"):
        protocol.recv_frame(b, "a test peer")
    assert b.recv(64) == b"x" * 16  # nothing of the frame was read
    a.sendall(protocol.encode(("fine",)))
    assert protocol.recv_frame(b) == ("fine",)
    a.close()
    b.close()


def test_the_fork_server_refuses_a_length_above_max_frame():
    buf = bytearray(protocol.encode(("spawn", 1)) + protocol.HEADER.pack(protocol.MAX_FRAME + 1))
    with pytest.raises(protocol.FrameTooLargeError):
        worker_pool._frames(buf)


@TRANSPORTS
def test_listener_never_unpickles_before_auth(listener, tmp_path, transport):
    """A frame sent instead of the handshake is dropped unread: the file is never made."""
    target = tmp_path / "pwned"
    sock = raw_connection(listener.address, transport)
    assert len(protocol._recv_exactly(sock, protocol.NONCE_BYTES)) == protocol.NONCE_BYTES
    sock.sendall(malicious_frame(str(target)) * 3)
    wait_closed_by_peer(sock)
    sock.close()
    assert not target.exists()
    assert listener.messages == []


@TRANSPORTS
def test_listener_ignores_frames_after_a_bad_proof(listener, tmp_path, transport):
    target = tmp_path / "pwned"
    sock = raw_connection(listener.address, transport)
    nonce = protocol._recv_exactly(sock, protocol.NONCE_BYTES)
    bad_proof = protocol._mac(WRONG, b"client", nonce) + os.urandom(protocol.NONCE_BYTES)
    sock.sendall(bad_proof + malicious_frame(str(target)))
    wait_closed_by_peer(sock)
    sock.close()
    assert not target.exists()
    assert listener.messages == []


def test_listener_reads_frames_sent_with_the_proof(listener):
    """Proof and first frame in one packet: the frame is decoded once the proof checks out."""
    sock = socket.create_connection(listener.address)
    nonce = protocol._recv_exactly(sock, protocol.NONCE_BYTES)
    client_nonce = os.urandom(protocol.NONCE_BYTES)
    proof = protocol._mac(TOKEN, b"client", nonce) + client_nonce
    sock.sendall(proof + protocol.encode(("first",)) + protocol.encode(("second",)))
    answer = protocol._recv_exactly(sock, protocol.MAC_BYTES)
    assert hmac.compare_digest(answer, protocol._mac(TOKEN, b"server", client_nonce))
    assert read_frame(sock) == ("echo", ("first",))
    assert read_frame(sock) == ("echo", ("second",))
    sock.close()


def test_local_peers_connect_over_the_unix_socket(listener):
    """A listener on this machine is reached over its Unix socket, authenticated all the same."""
    sock = protocol.connect(listener.address, TOKEN)
    assert sock.family == socket.AF_UNIX
    sock.sendall(protocol.encode(("over", "unix")))
    assert read_frame(sock) == ("echo", ("over", "unix"))
    sock.close()
    with pytest.raises(ConnectionError):
        protocol.connect(listener.address, WRONG)
    tcp = protocol.connect(listener.address, TOKEN, local=False)
    assert tcp.family == socket.AF_INET
    tcp.sendall(protocol.encode(("over", "tcp")))
    assert read_frame(tcp) == ("echo", ("over", "tcp"))
    tcp.close()


def test_other_machines_are_reached_over_tcp():
    assert protocol.is_local("127.0.0.1")
    assert not protocol.is_local("192.0.2.1")  # TEST-NET-1: never an address of this host


def test_a_listener_gone_from_the_unix_socket_is_still_reached_over_tcp():
    """A peer whose Unix name is unavailable (taken, or another network namespace) is
    reached over TCP."""
    reactor = Reactor(TOKEN, name="test-tcp-only")
    try:
        squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        squatter.bind(("127.0.0.1", 0))
        port = squatter.getsockname()[1]
        squatter.close()
        blocker = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        blocker.bind(protocol.local_name("127.0.0.1", port))  # the name is taken
        try:
            messages = []
            address = reactor.listen("127.0.0.1", port, lambda conn, m: messages.append(m))
            blocker.close()  # the name is free again, but nobody accepts on it
            sock = protocol.connect(address, TOKEN)
            assert sock.family == socket.AF_INET
            sock.sendall(protocol.encode(("hello",)))
            wait_for(lambda: messages == [("hello",)], timeout=5)
            sock.close()
        finally:
            blocker.close()
    finally:
        reactor.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_a_unix_name_taken_by_another_user_is_not_trusted():
    """Any local user can bind an abstract Unix name first; a client must not talk to such a
    squatter but reach the real listener over TCP."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    squatter = os.fork()
    if squatter == 0:  # another user takes the name the listener will want
        try:
            os.setuid(65534)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(protocol.local_name("127.0.0.1", port))
            sock.listen(8)
            os.write(ready_w, b"x")
            os.read(done_r, 1)
        finally:
            os._exit(0)
    reactor = Reactor(TOKEN, name="test-squatted")
    try:
        assert os.read(ready_r, 1) == b"x"
        messages = []
        address = reactor.listen("127.0.0.1", port, lambda conn, m: messages.append(m))
        sock = protocol.connect(address, TOKEN, timeout=5)
        assert sock.family == socket.AF_INET
        sock.sendall(protocol.encode(("real",)))
        wait_for(lambda: messages == [("real",)], timeout=5)
        sock.close()
    finally:
        os.write(done_w, b"x")
        os.waitpid(squatter, 0)
        reactor.stop()
        for fd in (ready_r, ready_w, done_r, done_w):
            os.close(fd)


def test_listener_survives_half_handshakes(listener):
    """Clients that hang up mid-handshake do not disturb the listener."""
    for _ in range(5):
        sock = socket.create_connection(listener.address)
        protocol._recv_exactly(sock, protocol.NONCE_BYTES)
        sock.sendall(b"\x00" * 10)
        sock.close()
    good = protocol.connect(listener.address, TOKEN)
    good.sendall(protocol.encode(("still", "here")))
    assert read_frame(good) == ("echo", ("still", "here"))
    good.close()
    wait_for(lambda: listener.messages == [("still", "here")], timeout=5)


# -- connections that never prove the token ----------------------------------------------------
def test_the_oldest_waiting_connection_is_evicted_when_too_many_wait(monkeypatch):
    """Beyond the cap a new connection evicts the oldest unauthenticated one; a client
    dropped that way hears "closed before the handshake", naming the listener, and a real
    client still gets in."""
    monkeypatch.setattr(admission, "MAX_UNAUTHENTICATED", 4)
    reactor = Reactor(TOKEN, name="test-cap")
    closes = []
    try:
        address = reactor.listen("127.0.0.1", 0, lambda c, m: c.send(("echo", m)), closes.append)
        victim = socket.create_connection(address, timeout=5)
        protocol._recv_exactly(victim, protocol.NONCE_BYTES)
        flood = [socket.create_connection(address, timeout=5) for _ in range(6)]
        for sock in flood:
            protocol._recv_exactly(sock, protocol.NONCE_BYTES)
        wait_for(lambda: len(closes) == 3, timeout=5)  # the victim and the 2 oldest of the flood
        victim_name = f"127.0.0.1:{address[1]}"
        with pytest.raises(ConnectionError, match="closed the connection before the handshake"):
            # (the challenge it already read is gone: it answers one it never gets)
            protocol.client_handshake(victim, TOKEN, timeout=5, listener=victim_name)
        victim.close()
        for sock in flood[:2]:
            wait_closed_by_peer(sock)
        good = protocol.connect(address, TOKEN, local=False)
        good.sendall(protocol.encode("ping"))
        assert read_frame(good) == ("echo", "ping")
        good.close()
        for sock in flood:
            sock.close()
    finally:
        reactor.stop()


def test_a_flood_over_tcp_cannot_evict_this_users_local_peers(monkeypatch):
    """Our own user's connections over the Unix socket wait in a table of their own."""
    monkeypatch.setattr(admission, "MAX_UNAUTHENTICATED", 2)
    reactor = Reactor(TOKEN, name="test-cap-local")
    closes = []
    try:
        address = reactor.listen("127.0.0.1", 0, lambda c, m: c.send(("echo", m)), closes.append)
        local = raw_connection(address, "unix")
        nonce = protocol._recv_exactly(local, protocol.NONCE_BYTES)
        flood = [socket.create_connection(address, timeout=5) for _ in range(10)]
        for sock in flood:
            protocol._recv_exactly(sock, protocol.NONCE_BYTES)
        wait_for(lambda: len(closes) == 8, timeout=5)
        client_nonce = os.urandom(protocol.NONCE_BYTES)
        local.sendall(protocol._mac(TOKEN, b"client", nonce) + client_nonce)
        answer = protocol._recv_exactly(local, protocol.MAC_BYTES)
        assert hmac.compare_digest(answer, protocol._mac(TOKEN, b"server", client_nonce))
        local.sendall(protocol.encode("ping"))
        assert read_frame(local) == ("echo", "ping")
        local.close()
        for sock in flood:
            sock.close()
    finally:
        reactor.stop()


def test_a_connection_that_never_proves_the_token_is_closed_at_the_deadline(monkeypatch):
    monkeypatch.setattr(protocol, "HANDSHAKE_TIMEOUT", 0.5)
    reactor = Reactor(TOKEN, name="test-deadline")
    try:
        address = reactor.listen("127.0.0.1", 0, lambda c, m: None)
        idle = [raw_connection(address, transport) for transport in ("tcp", "unix")]
        for sock in idle:
            protocol._recv_exactly(sock, protocol.NONCE_BYTES)
        started = time.monotonic()
        for sock in idle:
            wait_closed_by_peer(sock, timeout=5)
            sock.close()
        assert 0.4 < time.monotonic() - started < 5
        # An authenticated connection is not subject to it.
        good = protocol.connect(address, TOKEN)
        good.settimeout(1.0)
        with pytest.raises(TimeoutError):
            good.recv(1)
        good.close()
    finally:
        reactor.stop()


# -- the listeners of a live cluster ------------------------------------------------------------
@redray.remote
def worker_address_while_blocked(mark_file: str, release_file: str):
    from redray.core import context

    host, port = context.current.address[:2]
    mark(mark_file, f"{host}:{port}:{os.getpid()}")
    block_until(release_file)
    return port


def attack(
    address: tuple[str, int], target: str, with_bad_proof: bool, transport: str = "tcp"
) -> None:
    """Connect without the token and send a pickle that would create `target`."""
    sock = raw_connection(address, transport)
    nonce = protocol._recv_exactly(sock, protocol.NONCE_BYTES)
    data = malicious_frame(target)
    if with_bad_proof:
        data = protocol._mac(WRONG, b"client", nonce) + os.urandom(protocol.NONCE_BYTES) + data
    sock.sendall(data * 2)
    wait_closed_by_peer(sock)  # dropped: the server hung up on us
    sock.close()


def request(address: tuple[str, int], token: bytes, message: tuple):
    sock = protocol.connect(address, token)
    try:
        sock.sendall(protocol.encode(message))
        return read_frame(sock)
    finally:
        sock.close()


@pytest.mark.timeout(60)
@TRANSPORTS
@pytest.mark.parametrize("with_bad_proof", [False, True], ids=["no-proof", "bad-proof"])
def test_raylet_drops_clients_without_the_token(ray_start, tmp_path, with_bad_proof, transport):
    node = redray.nodes()[0]
    address = (node["NodeManagerAddress"], node["NodeManagerPort"])
    target = tmp_path / "pwned-raylet"
    attack(address, str(target), with_bad_proof, transport)
    assert not target.exists()
    # A client holding the token is served, and the node still runs tasks.
    token = redray.core.context.current.reactor.token
    reply = request(address, token, ("store_stats", 7))
    assert reply[0] == "reply" and reply[1] == 7 and "capacity" in reply[2]
    with pytest.raises(ConnectionError):
        protocol.connect(address, WRONG)
    assert not target.exists()
    assert redray.get(worker_port.remote(), timeout=30) > 0


@redray.remote
def worker_port():
    from redray.core import context

    return context.current.address[1]


@pytest.mark.timeout(60)
@TRANSPORTS
@pytest.mark.parametrize("with_bad_proof", [False, True], ids=["no-proof", "bad-proof"])
def test_worker_drops_clients_without_the_token(ray_start, gate, with_bad_proof, transport):
    ref = worker_address_while_blocked.remote(gate.path("address"), gate.release_file)
    host, port, pid = gate.wait_mark("address").split(":")
    address = (host, int(port))
    assert host == "127.0.0.1"  # listeners bind to loopback unless told otherwise
    target = gate.path("pwned-worker")
    attack(address, target, with_bad_proof, transport)
    assert not os.path.exists(target)
    # The worker is alive and serves a client that holds the token.
    assert psutil.pid_exists(int(pid))
    reply = request(address, redray.core.context.current.reactor.token, ("get_obj", 3, b"\0" * 16))
    assert reply == ("reply", 3, ("lost",))
    gate.open()
    assert redray.get(ref, timeout=30) == int(port)
    assert not os.path.exists(target)
