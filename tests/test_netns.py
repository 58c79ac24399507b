"""Nodes on separate network stacks: two raylets in their own network namespaces.

Each namespace is a host with its own address, joined to the root namespace by a veth pair;
traffic between the two namespaces is routed through the root one. The head and Redis run in
the root namespace. Needs root and `ip netns` (skipped cleanly otherwise).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time

import numpy as np
import pytest

import redray
from redray.gcs import Gcs
from redray.node import launch as node_mod
from redray.node.redis_server import RedisServer, free_port
from redray.transport.protocol import new_token

TAG = f"{os.getpid() % 10000}"
NAMESPACES = {  # namespace -> (host-side veth, namespace-side veth, subnet prefix)
    f"rr{TAG}a": (f"rr{TAG}ah", f"rr{TAG}an", "10.231.1"),
    f"rr{TAG}b": (f"rr{TAG}bh", f"rr{TAG}bn", "10.231.2"),
}
HEAD_IP = "10.231.1.1"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def _setup_namespaces() -> str | None:
    """Create the namespaces; returns a reason to skip when the machine does not allow it."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return "needs root and iproute2"
    try:
        for ns, (host_if, ns_if, net) in NAMESPACES.items():
            _ip("netns", "add", ns)
            _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
            _ip("link", "set", ns_if, "netns", ns)
            _ip("addr", "add", f"{net}.1/24", "dev", host_if)
            _ip("link", "set", host_if, "up")
            _ip("-n", ns, "addr", "add", f"{net}.2/24", "dev", ns_if)
            _ip("-n", ns, "link", "set", ns_if, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "route", "add", "default", "via", f"{net}.1")
        with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
            f.write("1")
    except (OSError, subprocess.SubprocessError) as exc:
        _teardown_namespaces()
        return f"cannot create network namespaces here: {exc}"
    return None


def _teardown_namespaces() -> None:
    for ns, (host_if, _, _) in NAMESPACES.items():
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


@pytest.fixture(scope="module")
def namespaced_cluster():
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        forwarding = f.read().strip()
    reason = _setup_namespaces()
    if reason is not None:
        pytest.skip(reason)
    redis = started = None
    nodes: list[node_mod.StartedNode] = []
    try:
        password = secrets.token_hex(8)
        redis = RedisServer.start(host="0.0.0.0", port=free_port("0.0.0.0"), password=password)
        redis.wait_ready()
        url = f"redis://:{password}@{HEAD_IP}:{redis.port}"
        token = new_token()
        gcs = Gcs(url)
        gcs.init_cluster(token)

        def start(ip: str, resources: dict, head: bool = False, prefix: tuple = ()):
            return node_mod.start_node(
                head=head,
                token=token,
                cluster="default",
                resources=node_mod.default_resources(1, None, resources, ip, head=head),
                object_store_memory=300 * 1024 * 1024,
                node_ip_address=ip,
                gcs_url=url,
                private=True,
                command_prefix=prefix,
            )

        nodes.append(start(HEAD_IP, {}, head=True))
        for ns, (_, _, net) in NAMESPACES.items():
            nodes.append(start(f"{net}.2", {ns[-1]: 1}, prefix=("ip", "netns", "exec", ns)))
        deadline = time.monotonic() + 20
        while len([n for n in gcs.nodes() if n["alive"]]) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        gcs.close()
        redray.init(address=url, _node_ip_address=HEAD_IP)
        started = True
        yield
    finally:
        if started:
            redray.shutdown()
        for started_node in nodes:
            started_node.stop()
            node_mod.remove_session_dir(started_node.session_dir)
        if redis is not None:
            redis.stop()
        _teardown_namespaces()
        with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
            f.write(forwarding)


def test_every_node_has_its_own_address(namespaced_cluster):
    addresses = sorted(n["NodeManagerAddress"] for n in redray.nodes() if n["Alive"])
    assert addresses == ["10.231.1.1", "10.231.1.2", "10.231.2.2"]


def test_object_made_in_one_namespace_is_used_in_the_other(namespaced_cluster):
    @redray.remote(resources={"a": 0.5})
    def make() -> np.ndarray:
        return np.arange(8 * 1024 * 1024, dtype=np.int64)  # 64 MB, stored in namespace a

    @redray.remote(resources={"b": 0.5})
    def total(array: np.ndarray) -> tuple[int, str]:
        return int(array.sum()), redray.get_runtime_context().get_node_id()

    n = 8 * 1024 * 1024
    result, where = redray.get(total.remote(make.remote()), timeout=60)
    assert result == n * (n - 1) // 2
    b_node = next(x["NodeID"] for x in redray.nodes() if x["NodeManagerAddress"] == "10.231.2.2")
    assert where == b_node


def test_actor_in_a_namespace_serves_the_driver(namespaced_cluster):
    @redray.remote(resources={"a": 0.5})
    class Counter:
        def __init__(self):
            self.n = 0

        def incr(self) -> int:
            self.n += 1
            return self.n

    counter = Counter.remote()
    assert redray.get([counter.incr.remote() for _ in range(5)], timeout=30) == [1, 2, 3, 4, 5]
