"""Wire format and trust: length-prefixed pickle frames behind an HMAC handshake.

Every connection between redray processes starts with a mutual challenge-response on the
cluster token. Until it succeeds the listener reads exactly the handshake's raw bytes and never
unpickles anything, so a peer without the token cannot make a listener run code.

Handshake (all raw bytes):
    server -> client   32-byte server nonce
    client -> server   HMAC(token, "client" + server nonce) || 32-byte client nonce
    server -> client   HMAC(token, "server" + client nonce), or REJECTED for a wrong proof

A listener gives a connection `HANDSHAKE_TIMEOUT` seconds to prove it holds the token and
keeps a bounded number waiting (redray/transport/admission.py); a client it dropped hears
"closed before the handshake", told apart from a refused token by REJECTED.

No frame is longer than `MAX_FRAME`: large values travel through the object store and the
object manager's raw byte streams, never as frames. The biggest frame redray itself sends
is a pickled function or class (refused above 100 MB, see core/serialization.py); task
arguments and results above 100 KiB go through the store. A reader that meets a longer
length prefix closes the connection before buffering any of it: the stream is corrupt, or
the peer is not a redray process.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pickle
import socket
import struct

HEADER = struct.Struct("<I")
NONCE_BYTES = 32
MAC_BYTES = 32
CLIENT_PROOF_BYTES = MAC_BYTES + NONCE_BYTES
MAX_FRAME = 256 * 2**20
HANDSHAKE_TIMEOUT = 5.0  # seconds a listener waits for a connection's proof of the token
REJECTED = b"\0" * MAC_BYTES  # the server's answer to a wrong proof, before it hangs up


class AuthenticationError(ConnectionError):
    """The peer does not hold the cluster token."""


class FrameTooLargeError(ConnectionError):
    """A length prefix above MAX_FRAME: the connection is unusable and is closed."""

    def __init__(self, length: int, peer: object = ""):
        source = f" from {peer}" if peer else ""
        super().__init__(
            f"a frame of {length} bytes{source} exceeds MAX_FRAME ({MAX_FRAME} bytes): "
            "closing the connection (a corrupt stream, or not a redray peer)"
        )


def new_token() -> bytes:
    """A fresh random cluster token."""
    return os.urandom(32)


def encode(message: object) -> bytes:
    """One frame: 4-byte little-endian length, then the pickled message."""
    payload = pickle.dumps(message, protocol=5)
    return HEADER.pack(len(payload)) + payload


def _mac(token: bytes, role: bytes, nonce: bytes) -> bytes:
    return hmac.new(token, role + nonce, hashlib.sha256).digest()


def server_challenge() -> bytes:
    return os.urandom(NONCE_BYTES)


def server_verify(token: bytes, nonce: bytes, client_proof: bytes) -> bytes | None:
    """The server's answer to a valid client proof, or None when the proof is wrong."""
    mac, client_nonce = client_proof[:MAC_BYTES], client_proof[MAC_BYTES:]
    if not hmac.compare_digest(mac, _mac(token, b"client", nonce)):
        return None
    return _mac(token, b"server", client_nonce)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        chunk = sock.recv(n - len(chunks))
        if not chunk:
            raise ConnectionError("connection closed by the peer")
        chunks += chunk
    return bytes(chunks)


def client_handshake(
    sock: socket.socket, token: bytes, timeout: float = 10.0, listener: str = ""
) -> None:
    """Prove we hold the token and check that the server does too (blocking).

    ConnectionError when the server hangs up first or stays silent for `timeout` seconds,
    AuthenticationError when it refuses our token or cannot prove it holds it. `listener`
    names the server in the errors."""
    where = f"the redray listener at {listener}" if listener else "the redray listener"
    previous = sock.gettimeout()
    sock.settimeout(timeout)
    try:
        nonce = _recv_exactly(sock, NONCE_BYTES)
        client_nonce = os.urandom(NONCE_BYTES)
        sock.sendall(_mac(token, b"client", nonce) + client_nonce)
        answer = _recv_exactly(sock, MAC_BYTES)
        if answer == REJECTED:
            raise AuthenticationError(
                f"{where} refused our cluster token: it belongs to another cluster"
            )
        if not hmac.compare_digest(answer, _mac(token, b"server", client_nonce)):
            raise AuthenticationError(f"{where} failed to prove it holds the cluster token")
    except AuthenticationError:
        raise
    except TimeoutError as exc:
        raise ConnectionError(
            f"{where} did not complete the handshake within {timeout:g} s "
            "(is the node overloaded, or is this not a redray listener?)"
        ) from exc
    except ConnectionError as exc:  # EOF, reset, broken pipe
        raise ConnectionError(
            f"{where} closed the connection before the handshake finished: it is shutting "
            f"down, or it dropped us (it drops connections that do not prove the cluster "
            f"token within {HANDSHAKE_TIMEOUT:g} s, the oldest first when too many wait)"
        ) from exc
    finally:
        sock.settimeout(previous)


def send_frame(sock: socket.socket, message: object) -> None:
    """Write one frame on a blocking socket."""
    sock.sendall(encode(message))


def recv_frame(sock: socket.socket, peer: object = "") -> object:
    """Read one frame from a blocking, already authenticated socket; FrameTooLargeError
    (nothing of it read) when its length is above MAX_FRAME."""
    (length,) = HEADER.unpack(_recv_exactly(sock, HEADER.size))
    if length > MAX_FRAME:
        raise FrameTooLargeError(length, peer)
    return pickle.loads(_recv_exactly(sock, length))


def local_name(host: str, port: int) -> bytes:
    """The abstract Unix socket a listener on host:port also accepts on. Linux's abstract
    namespace belongs to the network namespace and leaves no file behind, even on SIGKILL."""
    return f"\0redray:{host}:{port}".encode()


_local_hosts: dict[str, bool] = {}
_PEERCRED = getattr(socket, "SO_PEERCRED", 17)  # Linux's value, for Pythons that lack the name


def is_local(host: str) -> bool:
    """Whether host is an address of this machine (as seen from this network namespace)."""
    local = _local_hosts.get(host)
    if local is None:
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            probe.bind((host, 0))
            local = True
        except OSError:
            local = False
        finally:
            probe.close()
        _local_hosts[host] = local
    return local


def peer_uid(sock: socket.socket) -> int:
    """The user id of the process at the other end of a Unix socket (the kernel's word)."""
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, _PEERCRED, 12))
    return uid


def _connect_local(address: tuple[str, int], timeout: float) -> socket.socket | None:
    """A Unix-socket connection to a listener on this machine, or None (then use TCP).

    Loopback TCP costs each message a trip through the TCP stack on both sides; a Unix
    socket does the same job in about half the time."""
    if not hasattr(socket, "AF_UNIX") or os.environ.get("REDRAY_UNIX_SOCKETS") == "0":
        return None
    if not is_local(address[0]):
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(local_name(*address))
        # Any local user may bind an abstract name first; only trust one of our own user's
        # (who could do anything to us anyway). Else: TCP, where the port proves the peer.
        if peer_uid(sock) != os.getuid():
            raise ConnectionRefusedError("the local socket belongs to another user")
    except OSError:
        sock.close()
        return None
    return sock


def connect(
    address: tuple[str, int], token: bytes, timeout: float = 10.0, local: bool = True
) -> socket.socket:
    """An authenticated, blocking connection to a redray listener: over a Unix socket when
    the listener is on this machine and accepts on one (`local`), else TCP."""
    sock = _connect_local(address, timeout) if local else None
    if sock is None:
        sock = socket.create_connection(address, timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        client_handshake(sock, token, timeout, f"{address[0]}:{address[1]}")
    except BaseException:
        sock.close()
        raise
    return sock
