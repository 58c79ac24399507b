"""Entry point of a worker process (forked by the zygote): join the raylet, run tasks."""

from __future__ import annotations

import logging
import os
import pickle
import sys
from typing import Any

from redray.core import context
from redray.core.executor import Executor
from redray.transport.connection import Connection
from redray.worker import CoreWorker


def main(config: dict[str, Any]) -> None:
    """Start the core worker in worker mode and run pushed tasks until told to exit."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    os.environ["REDRAY_WORKER"] = "1"
    worker = CoreWorker(
        mode="worker",
        token=config["token"],
        raylet_address=tuple(config["raylet_address"]),
        gcs_url=config["gcs_url"],
        cluster=config["cluster"],
        worker_id=config["worker_id"],
        job_id="",
        namespace="",
        listen_host=config["listen_host"],
    )
    context.current = worker
    executor = Executor(
        worker.peers, worker.ownership, worker.objects, worker.jobs, worker.submitter, worker.raylet
    )
    executor.create_actor = _create_actor
    worker.executor = executor
    worker.raylet.send(("ready",))
    executor.run()


def _create_actor(executor: Executor, conn: Connection, message: tuple) -> None:
    # asyncio and the actor machinery: imported by the workers that become actors only (the
    # fork server preloads them too, once idle, so a fork shares the pages).
    from redray.core.actor_runtime import create_actor

    create_actor(executor, conn, message)


def _main_from_fd(argv: list[str]) -> None:
    """A worker started by exec (a runtime env with its own interpreter): its configuration
    arrives pickled on the inherited pipe named by ``--config-fd``."""
    from redray.node.worker_pool import die_with_parent

    die_with_parent()
    fd = int(argv[argv.index("--config-fd") + 1])
    with os.fdopen(fd, "rb") as pipe:
        config = pickle.loads(pipe.read())
    main(config)


if __name__ == "__main__":
    try:
        _main_from_fd(sys.argv)
    finally:
        os._exit(1)
