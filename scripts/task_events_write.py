"""What storing task events costs a raylet and Redis, per task attempt, in steady state.

Records batches of finished calls with an owner's recorder, ships them (pickled) and feeds
them through the raylet's merge and write (redray.state.events.merge, keys.write_task_events)
into a private redis-server, past the retention cap so that every write also drops the
oldest, and prints the CPU time per attempt of each step: the owner's recording, the
shipment's pickling, the raylet's merge and its Redis call, and Redis itself (INFO cpu). No cluster runs, so the figures hold on a busy machine where the
microbenchmark's ops/s do not (see scripts/task_events_cost.py for whole workloads).

    python scripts/task_events_write.py [--batch 1000] [--batches 300] [--cap 100000]
                                        [--queued]
"""

from __future__ import annotations

import argparse
import pickle
import time
from types import SimpleNamespace

from redray.core.ids import IdSource
from redray.gcs import Gcs
from redray.node.redis_server import RedisServer
from redray.state import events, keys

RESOURCES = {"CPU": 1.0}


def finished_calls(ids: list[bytes], node: str, worker: str, reported: bool) -> list:
    """Calls of one function that ended with their worker's reply, as their owner holds them."""
    now = time.time()
    run = (now, False, node, worker, 4242)
    options = SimpleNamespace(name="f", resources=RESOURCES)
    job = SimpleNamespace(job_id="01000000")
    return [
        SimpleNamespace(
            task_id=task_id, attempt=0, created=now, pushed=time.monotonic(), run=run,
            options=options, job=job, actor=None, parent=None, reported=reported,
        )
        for task_id in ids
    ]  # fmt: skip


def pending_reports(ids: list[bytes]) -> list[tuple]:
    """Reports of tasks still queued after an interval, as an owner records them."""
    now = time.time()
    return [
        (events.PENDING, task_id, 0, now, "f", "01000000", None, None, RESOURCES,
         "PENDING_NODE_ASSIGNMENT")
        for task_id in ids
    ]  # fmt: skip


def redis_cpu(gcs: Gcs) -> float:
    info = gcs.redis.info("cpu")
    return info["used_cpu_user"] + info["used_cpu_sys"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1000, help="attempts per write")
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--cap", type=int, default=100_000, help="attempts kept")
    parser.add_argument(
        "--queued",
        action="store_true",
        help="each attempt is first reported pending (a queued task), then finished",
    )
    args = parser.parse_args()
    server = RedisServer.start()
    try:
        server.wait_ready()
        gcs = Gcs(server.url, cluster="bench")
        node, worker = "ab" * 14, "cd" * 14
        process = {"worker_id": worker, "pid": 4242}
        measured = max(1, args.batches // 2)  # (the second half: retention at work)
        recording = shipping = merging = writing = 0.0
        redis_before = 0.0
        queued: list[bytes] = []
        owner_ids = IdSource()  # (one driver's calls)
        for n in range(args.batches):
            ids = [owner_ids.task_id() for _ in range(args.batch)]
            calls = finished_calls(queued, node, worker, True) + pending_reports(ids)
            if not args.queued:
                calls = finished_calls(ids, node, worker, False)
            queued = ids
            if n == args.batches - measured:
                redis_before = redis_cpu(gcs)
            recorder = events.TaskEventRecorder(lambda *_: None, None, None)
            t0 = time.process_time()
            for call in calls:
                if type(call) is tuple:
                    recorder.add(call)
                else:
                    recorder.ended(call, None)
            t1 = time.process_time()
            shipped, ended, _ = pickle.loads(pickle.dumps(recorder.take(), protocol=5))
            t2 = time.process_time()
            merged = events.merge([(process, shipped, ended)], node)
            t3 = time.process_time()
            keys.write_task_events(gcs, merged, args.cap, args.cap)
            t4 = time.process_time()
            if n >= args.batches - measured:
                recording += t1 - t0
                shipping += t2 - t1
                merging += t3 - t2
                writing += t4 - t3
        attempts = measured * args.batch
        redis = redis_cpu(gcs) - redis_before
        stored = keys.task_count(gcs)
        memory = gcs.redis.info("memory")["used_memory"]

        def us(seconds: float) -> str:
            return f"{seconds / attempts * 1e6:.2f}"

        what = "queued (reported pending, then finished)" if args.queued else "finished"
        print(
            f"{attempts:,} {what} attempts in writes of {args.batch:,}, {stored:,} kept: CPU us per "
            f"attempt: owner's recording {us(recording)} (pending reports included), "
            f"pickle+unpickle {us(shipping)}, raylet merge {us(merging)}, raylet "
            f"Redis call {us(writing)}, Redis {us(redis)}; Redis memory "
            f"{memory / stored * 1e-3 if stored else 0:.2f} KB per kept attempt"
        )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
