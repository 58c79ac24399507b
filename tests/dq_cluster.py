"""A cluster for the durable-queue tests: a redis-server with AOF (fsync on every write, so a
SIGKILLed Redis comes back with every acknowledged write) that a test can kill and restart
on the same port, and one head node started on it; this process is its driver."""

from __future__ import annotations

import os
import secrets
import signal
import time
from pathlib import Path

import psutil
import redis

import redray
from redray.gcs import Gcs
from redray.node import launch as node_mod
from redray.node.redis_server import RedisServer
from redray.transport.protocol import new_token

STORE = 200 * 1024 * 1024


class QueueCluster:
    """Redis with AOF plus one head node; this process connected as its driver."""

    def __init__(self, directory: Path, num_cpus: int = 2):
        self.directory = str(directory)
        self.password = secrets.token_hex(8)
        self.redis = self._start_redis(port=0)
        self.url = self.redis.url
        self.gcs = Gcs(self.url)
        self.gcs.init_cluster(new_token())
        self.token = self.gcs.cluster_token()
        self.node = node_mod.start_node(
            head=True,
            token=self.token,
            cluster="default",
            resources=node_mod.default_resources(num_cpus, None, None, "127.0.0.1", head=True),
            object_store_memory=STORE,
            node_ip_address="127.0.0.1",
            gcs_url=self.url,
            private=True,
        )
        redray.init(address=self.url)

    def _start_redis(self, port: int) -> RedisServer:
        server = RedisServer.start(
            port=port, password=self.password, directory=self.directory, persistent=True
        )
        server.wait_ready()
        client = Gcs(server.url).redis
        deadline = time.monotonic() + 20
        while True:  # the server answers "LOADING" while it replays its AOF
            try:
                client.config_set("appendfsync", "always")
                break
            except (redis.BusyLoadingError, redis.ResponseError) as exc:
                if "loading" not in str(exc).lower() or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        client.close()
        return server

    def restart_redis(self) -> None:
        """SIGKILL Redis and start it again on its port, from its AOF."""
        old = self.redis
        os.kill(old.pid, signal.SIGKILL)
        old.process.wait()
        self.redis = self._start_redis(port=old.port)

    def shutdown(self) -> None:
        redray.shutdown()
        self.node.stop()
        node_mod.remove_session_dir(self.node.session_dir)
        self.gcs.close()
        self.redis.stop()


def kill(pid: int) -> bool:
    """SIGKILL pid; False if it was gone already."""
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
