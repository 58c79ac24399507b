"""init()/shutdown() cycles in one process: do threads, fds and memory stay flat?

Each cycle starts a private cluster, runs a task, puts and gets a stored object and, every
ACTOR_EVERY cycles, creates an actor (which starts the watcher thread) and awaits a stored
result (settled off the reactor loop), then shuts down. Prints one JSON line per cycle:
{"cycle", "threads", "fds", "rss_mb", "seconds"}, then the names of the threads left.

    PYTHONPATH=$PWD python scripts/init_cycles.py 1000
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import threading
import time

import psutil

import redray

ACTOR_EVERY = 4
STORED = 200_000  # bytes: above the inline limit, so in the object store


@redray.remote
def blob(size: int) -> bytes:
    return b"x" * size


@redray.remote
class Holder:
    def get(self) -> int:
        return 1


async def awaited(ref: redray.ObjectRef) -> bytes:
    return await ref


def one_cycle(index: int) -> None:
    redray.init(num_cpus=1)
    assert redray.get(blob.remote(10)) == b"x" * 10
    assert len(redray.get(redray.put(b"y" * STORED))) == STORED
    if index % ACTOR_EVERY == 0:
        holder = Holder.remote()
        assert redray.get(holder.get.remote()) == 1
        del holder
        assert len(asyncio.run(awaited(blob.remote(STORED)))) == STORED
    redray.shutdown()


def main(cycles: int) -> None:
    me = psutil.Process()
    start = time.monotonic()
    for index in range(cycles):
        one_cycle(index)
        gc.collect()
        sample = {
            "cycle": index + 1,
            "threads": threading.active_count(),
            "fds": me.num_fds(),
            "rss_mb": round(me.memory_info().rss / 2**20, 2),
            "seconds": round(time.monotonic() - start, 2),
        }
        print(json.dumps(sample), flush=True)
    print(json.dumps({"threads_left": [t.name for t in threading.enumerate()]}), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100)
