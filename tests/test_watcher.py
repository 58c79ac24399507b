"""The pub/sub watcher: it survives Redis going away and coming back, and says so in one
warning each way instead of a traceback per retry."""

from __future__ import annotations

import pytest
from conftest import last_json, run_driver

REDIS_GOES_AWAY = """
import json, logging, signal, threading, time
from urllib.parse import urlsplit
import psutil
import redis
import redray
from redray.core import context
from redray.node.redis_server import RedisServer
from redray.watcher import Watcher

redray.init(num_cpus=1)
gcs = context.current.gcs
received = []
got = threading.Event()

def on_message(event):
    received.append(event)
    got.set()

lost, back = threading.Event(), threading.Event()

class Events(logging.Handler):
    def emit(self, record):
        text = record.getMessage()
        if "Lost the connection to Redis" in text:
            lost.set()
        if "connection to Redis is back" in text:
            back.set()

logging.basicConfig()  # warnings to stderr, as a script that configures logging has them
logging.getLogger().addHandler(Events())
watcher = Watcher(gcs, {"ch:test": on_message}, lambda: False)
watcher.ensure_running()

def publish(n):
    client = redis.Redis.from_url(gcs.url)
    try:
        client.publish(gcs.channel("ch:test"), json.dumps({"n": n}))
    finally:
        client.close()

publish(1)
assert got.wait(10)
got.clear()

raylet = next(p for p in psutil.Process().children() if "redray.raylet" in p.cmdline())
server = next(p for p in raylet.children() if "redis-server" in p.name())
server.send_signal(signal.SIGKILL)  # (a zombie until the raylet reaps it: not waited for)
assert lost.wait(10), "no warning that Redis is gone"
time.sleep(1.5)  # Redis stays away a while: the watcher keeps retrying (quietly)
url = urlsplit(gcs.url)
restarted = RedisServer.start(url.hostname, url.port, url.password)
try:
    restarted.wait_ready()
    assert back.wait(15), "no word that Redis is back"
    publish(2)
    assert got.wait(10), "nothing delivered after Redis came back"
    alive = watcher._thread.is_alive()
    watcher.stop()
    redray.shutdown()
finally:
    restarted.stop()
print(json.dumps({"received": received, "alive": alive}))
"""


@pytest.mark.timeout(90)
def test_watcher_survives_redis_restart_with_one_warning_each_way():
    proc = run_driver(REDIS_GOES_AWAY, timeout=80)
    result = last_json(proc.stdout)
    assert result["received"] == [{"n": 1}, {"n": 2}]
    assert result["alive"] is True
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("Lost the connection to Redis") == 1, proc.stderr
    assert proc.stderr.count("The connection to Redis is back") == 1, proc.stderr
