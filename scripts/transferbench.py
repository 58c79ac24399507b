"""Cross-node object transfer throughput of redray, on one machine.

Starts Redis and two nodes (separate raylet processes with their own shared-memory stores,
on 127.0.0.1 and 127.0.0.2), makes an array on the second node and times how long the first
node takes to pull it into its own store (a `get` in a task on the first node: the value is
read zero-copy once it has arrived, so the time is the transfer).

    python scripts/transferbench.py              # 800 MB, 5 trials
    python scripts/transferbench.py --mb 200 --trials 3 --json
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import redray  # noqa: E402
from redray.gcs import Gcs  # noqa: E402
from redray.node import launch as node_mod
from redray.node.redis_server import RedisServer  # noqa: E402
from redray.transport.protocol import new_token  # noqa: E402


def start_cluster(store_bytes: int) -> tuple[RedisServer, list[node_mod.StartedNode], str]:
    redis = RedisServer.start(password=secrets.token_hex(8))
    redis.wait_ready()
    token = new_token()
    gcs = Gcs(redis.url)
    gcs.init_cluster(token)
    nodes = []
    for ip, head, extra in (("127.0.0.1", True, {"near": 1}), ("127.0.0.2", False, {"far": 1})):
        nodes.append(
            node_mod.start_node(
                head=head,
                token=token,
                cluster="default",
                resources=node_mod.default_resources(1, None, extra, ip, head=head),
                object_store_memory=store_bytes,
                node_ip_address=ip,
                gcs_url=redis.url,
                private=True,
            )
        )
    deadline = time.monotonic() + 20
    while len([n for n in gcs.nodes() if n["alive"]]) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    gcs.close()
    return redis, nodes, redis.url


@redray.remote(resources={"far": 0.5})
def make(n_bytes: int, seed: int) -> np.ndarray:
    return np.full(n_bytes, seed % 251, dtype=np.uint8)


@redray.remote(resources={"near": 0.5})
def pull(array_in_list: list) -> tuple[float, int]:
    started = time.perf_counter()
    array = redray.get(array_in_list[0])
    elapsed = time.perf_counter() - started
    return elapsed, int(array[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=800, help="object size in MB (default 800)")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    n_bytes = args.mb * 1000 * 1000
    redis, nodes, url = start_cluster(store_bytes=3 * n_bytes)
    try:
        redray.init(address=url, _node_ip_address="127.0.0.1")
        rates = []
        for trial in range(args.trials + 1):
            ref = make.remote(n_bytes, trial)
            redray.wait([ref], fetch_local=False)
            elapsed, last = redray.get(pull.remote([ref]))
            assert last == trial % 251
            if trial:  # the first round warms up both stores' pages
                rates.append(n_bytes / elapsed / 1e9)
            del ref
        result = {
            "object MB": args.mb,
            "GB/s mean": statistics.mean(rates),
            "GB/s stdev": statistics.pstdev(rates),
            "trials": [round(r, 3) for r in rates],
        }
        if args.json:
            print(json.dumps(result))
        else:
            print(
                f"cross-node transfer of {args.mb} MB: {result['GB/s mean']:.2f} "
                f"+- {result['GB/s stdev']:.2f} GB/s  (trials: {result['trials']})"
            )
    finally:
        redray.shutdown()
        for started in nodes:
            started.stop()
            node_mod.remove_session_dir(started.session_dir)
        redis.stop()


if __name__ == "__main__":
    main()
