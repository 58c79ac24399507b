"""The pub/sub watcher: it survives Redis going away and coming back, says so in one
warning each way instead of a traceback per retry, and has its caller re-read the tables
each time the subscription is made again."""

from __future__ import annotations

import pytest
import redis
from conftest import last_json, run_driver, wait_for

from redray.gcs import Gcs
from redray.node.redis_server import RedisServer
from redray.watcher import Watcher

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


@pytest.fixture
def own_redis(tmp_path):
    server = RedisServer.start(port=0, password="pw", directory=str(tmp_path))
    server.wait_ready()
    yield server
    server.stop()


@pytest.mark.timeout(60)
def test_watcher_rereads_the_tables_each_time_its_subscription_is_made_again(own_redis, tmp_path):
    """Messages published while the subscription is down are lost: each time it is made again
    (by redis-py after a dropped connection, or by the watcher after Redis restarted) the
    watcher calls resync, so the caller re-reads what it mirrors, before delivering more."""
    gcs = Gcs(own_redis.url, "watch")
    received, resyncs = [], []
    watcher = Watcher(
        gcs,
        {"ch:test": lambda event: received.append(event["n"])},
        lambda: False,
        resync=lambda: resyncs.append(len(received)),
    )
    watcher.ensure_running()
    gcs.publish("ch:test", {"n": 1})
    wait_for(lambda: received == [1])
    assert resyncs == []  # the first subscription needs no re-read

    with redis.Redis.from_url(own_redis.url) as admin:  # its connection dropped under it
        assert admin.client_kill_filter(_type="pubsub") >= 1
    wait_for(lambda: len(resyncs) == 1, timeout=20, message="no re-read after the drop")

    own_redis.process.kill()  # Redis itself goes, and comes back empty
    own_redis.process.wait()
    again = RedisServer.start(port=own_redis.port, password="pw", directory=str(tmp_path))
    own_redis.process = again.process
    again.wait_ready()
    wait_for(lambda: len(resyncs) == 2, timeout=20, message="no re-read after the restart")
    gcs.publish("ch:test", {"n": 2})
    wait_for(lambda: received == [1, 2], timeout=10)
    assert resyncs == [1, 1]
    watcher.stop()
    watcher.join(5)
    gcs.close()
