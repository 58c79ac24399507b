"""The `redray` command with real processes: start, status, drivers, node, stop, bad input.

Every command runs as `python -m redray.cli` in a subprocess with its own TMPDIR, so the
current-cluster file and session dirs of these tests live in a directory of their own.
`redray stop` only stops the nodes recorded in that current-cluster file and detached nodes
whose session dirs are in that TMPDIR's temp root (or the given --temp-dir): never a
developer's cluster, another checkout's or test run's (other TMPDIRs), nor the private
clusters of other tests. The head's embedded Redis gets a free port.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import pytest
import redis
from conftest import REPO, last_json, run_driver

from redray.gcs import Gcs
from redray.node.redis_server import free_port

pytestmark = pytest.mark.timeout(90)

HEAD_CPUS = 2
STORE = str(100 * 1024 * 1024)


def redray_cli(
    *args: str, tmpdir: Path, check: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess:
    """Run `python -m redray.cli ARGS` with TMPDIR=tmpdir; returns the completed process."""
    env = dict(os.environ, TMPDIR=str(tmpdir))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    for var in ("REDRAY_ADDRESS", "RAY_ADDRESS"):
        env.pop(var, None)
    proc = subprocess.run(
        [sys.executable, "-m", "redray.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"redray {' '.join(args)} exited with {proc.returncode}\n--- stdout\n"
            f"{proc.stdout}\n--- stderr\n{proc.stderr}"
        )
    return proc


def cluster_file(tmpdir: Path) -> Path:
    return tmpdir / f"redray-{os.getuid()}" / "current_cluster.json"


def node_tree(pids: list[int]) -> list[psutil.Process]:
    """The raylets and everything under them (zygote, workers, embedded redis-server)."""
    procs = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            procs += [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    return procs


def running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def cli_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def head(cli_tmp: Path) -> Iterator[dict[str, Any]]:
    """`redray start --head` on a free port; `redray stop` afterwards whatever happened."""
    port = free_port()
    try:
        started = redray_cli(
            "start",
            "--head",
            "--port",
            str(port),
            "--num-cpus",
            str(HEAD_CPUS),
            "--object-store-memory",
            STORE,
            "--resources",
            '{"custom": 3}',
            tmpdir=cli_tmp,
        )
        record = json.loads(cluster_file(cli_tmp).read_text())
        yield {"stdout": started.stdout, "port": port, "url": record["gcs_url"], **record}
    finally:
        redray_cli("stop", tmpdir=cli_tmp, check=False)


def driver(script: str, tmpdir: Path) -> Any:
    """Run a driver in its own interpreter (TMPDIR=tmpdir); returns its last JSON line."""
    return last_json(run_driver(script, env={"TMPDIR": str(tmpdir)}, timeout=60).stdout)


def test_console_script_is_declared() -> None:
    scripts = {e.name: e.value for e in metadata.entry_points(group="console_scripts")}
    assert scripts.get("redray") == "redray.cli:main"


def test_start_prints_how_to_connect(head: dict[str, Any], cli_tmp: Path) -> None:
    out = head["stdout"]
    url = head["url"]
    assert url.startswith("redis://:") and url.endswith(f"@127.0.0.1:{head['port']}")
    assert url in out
    assert 'redray.init(address="auto")' in out
    assert f'redray.init(address="{url}")' in out
    assert f"redray node --redis '{url}'" in out
    path = cluster_file(cli_tmp)
    assert path.stat().st_mode & 0o777 == 0o600
    assert head["cluster"] == "default" and len(head["pids"]) == 1
    # Redis is password-protected.
    with pytest.raises(Exception, match="(?i)auth"):
        Gcs(f"redis://127.0.0.1:{head['port']}").ping()


def test_start_daemonizes_the_node(head: dict[str, Any]) -> None:
    """The node outlives `redray start` and runs in a session of its own."""
    pid = head["pids"][0]
    assert psutil.pid_exists(pid)
    assert os.getsid(pid) == pid


def test_status_shows_node_and_resources(head: dict[str, Any], cli_tmp: Path) -> None:
    out = redray_cli("status", tmpdir=cli_tmp).stdout
    node_id = head["nodes"][0]["node_id"]
    assert "Nodes: 1 alive, 0 dead" in out
    assert node_id in out and "ALIVE (head)" in out
    assert f"0.0/{HEAD_CPUS:.1f} CPU" in out
    assert "0.0/3.0 custom" in out
    assert "100.00MiB object_store_memory" in out
    assert head["url"] not in out  # the password is not printed
    same = redray_cli("status", "--address", head["url"], tmpdir=cli_tmp).stdout
    assert node_id in same


def test_driver_with_address_auto(head: dict[str, Any], cli_tmp: Path) -> None:
    result = driver(
        """
        import json, redray
        redray.init(address="auto")

        @redray.remote
        def square(x):
            return x * x

        print(json.dumps([redray.get([square.remote(i) for i in range(5)]),
                          redray.cluster_resources()["CPU"]]))
        """,
        cli_tmp,
    )
    assert result == [[0, 1, 4, 9, 16], float(HEAD_CPUS)]


def test_driver_with_redis_url(head: dict[str, Any], cli_tmp: Path) -> None:
    """Also: a task's print goes to its worker's log file in the node's session when not
    sent to the driver (never to a pipe that was closed when `redray start` exited)."""
    result = driver(
        f"""
        import json, redray
        redray.init(address={head["url"]!r}, log_to_driver=False)

        @redray.remote
        def hello():
            print("hello from a detached node", flush=True)
            return "done"

        print(json.dumps([redray.get(hello.remote())]))
        """,
        cli_tmp,
    )
    assert result == ["done"]
    worker_logs = (Path(head["session_dir"]) / "logs").glob("worker-*.out")
    assert any("hello from a detached node" in log.read_text() for log in worker_logs)


def test_node_joins_the_cluster(head: dict[str, Any], cli_tmp: Path) -> None:
    """Also: --temp-dir is where the node's session (logs, spilled objects) goes."""
    temp_dir = cli_tmp / "node-temp"
    out = redray_cli(
        "node",
        "--redis",
        head["url"],
        "--num-cpus",
        "1",
        "--object-store-memory",
        STORE,
        "--temp-dir",
        str(temp_dir),
        tmpdir=cli_tmp,
    ).stdout
    assert "joined cluster 'default'" in out
    record = json.loads(cluster_file(cli_tmp).read_text())
    assert len(record["pids"]) == 2 and record["gcs_url"] == head["url"]
    session_dir = Path(record["nodes"][1]["session_dir"])
    assert session_dir.parent == temp_dir
    assert (session_dir / "logs" / "raylet.log").exists()
    assert f"Logs: {session_dir / 'logs'}" in out
    status = redray_cli("status", tmpdir=cli_tmp).stdout
    assert "Nodes: 2 alive, 0 dead" in status
    # (used may not be back to 0 yet: the last heartbeat can predate the previous driver's exit)
    assert re.search(rf"\d+\.\d/{HEAD_CPUS + 1:.1f} CPU", status), status
    result = driver(
        """
        import json, redray
        redray.init(address="auto")
        print(json.dumps([redray.cluster_resources()["CPU"], len(redray.nodes())]))
        """,
        cli_tmp,
    )
    assert result == [HEAD_CPUS + 1.0, 2]


def test_second_head_on_the_same_redis(head: dict[str, Any], cli_tmp: Path) -> None:
    """`--redis URL`: a named cluster gets a token of its own; the same cluster's is reused."""
    url = head["url"]
    other = f"clitest{os.getpid()}"
    out = redray_cli(
        "start",
        "--head",
        "--redis",
        url,
        "--cluster",
        other,
        "--num-cpus",
        "1",
        "--object-store-memory",
        STORE,
        tmpdir=cli_tmp,
    ).stdout
    assert f"--cluster {other}" in out
    status = redray_cli("status", "--address", url, "--cluster", other, tmpdir=cli_tmp).stdout
    assert "Nodes: 1 alive" in status and "0.0/1.0 CPU" in status
    default_token = Gcs(url).cluster_token()
    assert Gcs(url, other).cluster_token() not in (None, default_token)
    out = redray_cli(
        "start",
        "--head",
        "--redis",
        url,
        "--num-cpus",
        "1",
        "--object-store-memory",
        STORE,
        tmpdir=cli_tmp,
    ).stdout
    assert "standby head" in out
    assert Gcs(url).cluster_token() == default_token


def test_node_needs_a_cluster_in_redis(head: dict[str, Any], tmp_path: Path) -> None:
    proc = redray_cli(
        "node", "--redis", head["url"], "--cluster", "nosuch", tmpdir=tmp_path, check=False
    )
    assert proc.returncode == 1
    assert "No redray cluster 'nosuch'" in proc.stderr
    assert head["url"] not in proc.stderr  # the password is redacted


def test_the_heads_redis_is_its_own_process_with_aof_and_no_password_in_ps(
    head: dict[str, Any],
) -> None:
    entry = next(n for n in head["nodes"] if n["head"])
    redis_proc = psutil.Process(entry["redis_pid"])
    raylet = psutil.Process(entry["pid"])
    assert "redis-server" in redis_proc.name()
    # Not under the raylet (it outlives it), in a session of its own.
    assert redis_proc not in raylet.children(recursive=True)
    assert os.getsid(redis_proc.pid) == redis_proc.pid
    password = urlsplit(head["url"]).password
    assert password and password not in " ".join(redis_proc.cmdline())
    with redis.Redis.from_url(head["url"], decode_responses=True) as client:
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        data_dir = client.config_get("dir")["dir"]
    assert data_dir == os.path.join(entry["session_dir"], "redis")
    assert "Redis: pid " + str(redis_proc.pid) in head["stdout"]


def start_head(tmpdir: Path, *extra: str) -> dict[str, Any]:
    """`redray start --head` (1 CPU, a free port) with TMPDIR=tmpdir; its record."""
    redray_cli(
        "start",
        "--head",
        "--port",
        str(free_port()),
        "--num-cpus",
        "1",
        "--object-store-memory",
        STORE,
        *extra,
        tmpdir=tmpdir,
    )
    return json.loads(cluster_file(tmpdir).read_text())


@pytest.mark.timeout(120)
def test_stop_leaves_the_nodes_of_other_temp_roots_alone(
    head: dict[str, Any], cli_tmp: Path, tmp_path: Path
) -> None:
    """Another checkout's or test run's cluster (another TMPDIR, another --temp-dir) is not
    this stop's to stop, even when it is not recorded anywhere; the temp root in use is."""
    other = tmp_path / "other-checkout"
    other.mkdir()
    first = start_head(other)
    unrecorded = first["pids"][-1]
    custom = tmp_path / "custom-temp"
    second = start_head(other, "--temp-dir", str(custom))
    in_custom = second["pids"][-1]
    cluster_file(other).unlink()  # (lost: only a scan of the temp roots can find them)
    # Their Redis servers too: each head's Redis is a process of its own.
    redis_of = {
        pid: psutil.Process(record["nodes"][-1]["redis_pid"])
        for pid, record in ((unrecorded, first), (in_custom, second))
    }
    procs = node_tree([unrecorded, in_custom]) + list(redis_of.values())
    try:
        stranger = tmp_path / "stranger"
        stranger.mkdir()
        out = redray_cli("stop", tmpdir=stranger).stdout
        assert "No redray node was running" in out
        assert all(running(p) for p in procs), "stop killed another temp root's nodes"
        assert all(running(p) for p in node_tree(head["pids"]))
        out = redray_cli("stop", tmpdir=other).stdout
        assert f"Stopped 1 redray node(s): pid {unrecorded}." in out
        assert not running(redis_of[unrecorded]), "stop left the lost head's Redis running"
        assert all(running(p) for p in node_tree([in_custom]) + [redis_of[in_custom]])
        out = redray_cli("stop", "--temp-dir", str(custom), tmpdir=other).stdout
        assert f"Stopped 1 redray node(s): pid {in_custom}." in out
        assert not [p for p in procs if running(p)]
        assert all(running(p) for p in node_tree(head["pids"]))
    finally:
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()


def test_start_refuses_a_temp_dir_others_can_write(tmp_path: Path) -> None:
    temp_dir = tmp_path / "shared"
    temp_dir.mkdir()
    temp_dir.chmod(0o777)
    port = free_port()
    proc = redray_cli(
        "start",
        "--head",
        "--port",
        str(port),
        "--temp-dir",
        str(temp_dir),
        tmpdir=tmp_path,
        check=False,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"refusing to use {temp_dir}" in proc.stderr
    assert "writable by other users (mode drwxrwxrwx)" in proc.stderr
    assert os.listdir(temp_dir) == [] and not cluster_file(tmp_path).exists()
    assert not port_open(port)


@pytest.mark.parametrize("how", ["another-user", "symlink"])
def test_commands_refuse_a_temp_root_they_do_not_own(how: str, tmp_path: Path) -> None:
    """<TMPDIR>/redray-<uid> made first by someone else: start, node, status and stop all
    refuse it (it would hold the Redis password, or redirect them), and write nothing."""
    if how == "another-user" and os.geteuid() != 0:
        pytest.skip("needs root to chown")
    root = cluster_file(tmp_path).parent
    landing = tmp_path / "elsewhere"
    landing.mkdir(mode=0o700)
    if how == "symlink":
        root.symlink_to(landing)
        problem = "is a symbolic link"
    else:
        root.mkdir(mode=0o700)
        os.chown(root, 65534, 65534)
        landing = root
        problem = "belongs to"
    port = free_port()
    for args in (
        ["start", "--head", "--port", str(port)],
        ["node", "--redis", f"redis://127.0.0.1:{free_port()}"],
        ["status"],
        ["stop"],
    ):
        proc = redray_cli(*args, tmpdir=tmp_path, check=False)
        if args[0] == "node":  # (it needs the cluster's Redis first)
            assert "Cannot reach Redis" in proc.stderr
            continue
        assert proc.returncode == 1, (args, proc.stderr)
        assert f"refusing to use {root}" in proc.stderr and problem in proc.stderr, args
        assert "Traceback" not in proc.stderr
    assert os.listdir(landing) == []
    assert not port_open(port)


def test_files_of_a_detached_node_are_private(head: dict[str, Any], cli_tmp: Path) -> None:
    root = cluster_file(cli_tmp).parent
    session = Path(head["session_dir"])
    for path in (root, session, session / "logs", session / "redis"):
        assert stat.S_IMODE(path.lstat().st_mode) == 0o700, path
    redis_files = [p for p in (session / "redis").rglob("*") if p.is_file()]
    assert redis_files, "the head's Redis keeps no AOF"
    for path in (
        cluster_file(cli_tmp),
        Path(f"{cluster_file(cli_tmp)}.lock"),
        session / "logs" / "raylet.log",
        session / "logs" / "raylet.out",
        session / "logs" / "redis.log",
        *redis_files,
    ):
        assert stat.S_IMODE(path.lstat().st_mode) == 0o600, path


def test_stop_leaves_nothing_running(head: dict[str, Any], cli_tmp: Path) -> None:
    record = json.loads(cluster_file(cli_tmp).read_text())
    procs = node_tree(record["pids"])
    redis_pids = [n["redis_pid"] for n in record["nodes"] if n.get("redis_pid")]
    assert len(redis_pids) == 1
    procs.append(psutil.Process(redis_pids[0]))
    out = redray_cli("stop", tmpdir=cli_tmp).stdout
    assert f"Stopped {len(record['pids'])} redray node(s)" in out
    assert f"Stopped the cluster's Redis: pid {redis_pids[0]}" in out
    assert not [p for p in procs if running(p)]
    assert not port_open(head["port"])
    assert not cluster_file(cli_tmp).exists()
    again = redray_cli("stop", tmpdir=cli_tmp)
    assert "No redray node was running" in again.stdout
    status = redray_cli("status", tmpdir=cli_tmp, check=False)
    assert status.returncode == 1 and "No running redray cluster" in status.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["start", "--head", "--resources", "{not json"], "not valid JSON"),
        (["start", "--head", "--resources", "[1, 2]"], "must be a JSON object"),
        (["start", "--head", "--resources", '{"x": -1}'], "non-negative"),
        (["start", "--head", "--resources", '{"CPU": 1}'], "--num-cpus"),
        (["start", "--head", "--num-cpus", "-1"], "-1 is not in the range"),
        (["node", "--redis", "redis://127.0.0.1:9", "--num-gpus", "-2"], "-2 is not in the range"),
        (["start"], "--head"),
        (["start", "--head", "--node-ip-address", "not-an-ip"], "not an IP address"),
        (["start", "--head", "--node-ip-address", "0.0.0.0"], "every interface"),
        (["node", "--redis", "redis://127.0.0.1:9", "--node-ip-address", "::"], "every interface"),
        (["start", "--head", "--port", "0", "--temp-dir", "/proc/redray"], "cannot make a session"),
        (["status", "--address", "http://example"], "not a Redis URL"),
    ],
)
def test_invalid_input_is_a_clear_error(args: list[str], message: str, tmp_path: Path) -> None:
    proc = redray_cli(*args, tmpdir=tmp_path, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not cluster_file(tmp_path).exists()


def test_unreachable_redis_is_a_clear_error(tmp_path: Path) -> None:
    port = free_port()
    for args in (
        ["node", "--redis", f"redis://127.0.0.1:{port}"],
        ["status", "--address", f"127.0.0.1:{port}"],
    ):
        proc = redray_cli(*args, tmpdir=tmp_path, check=False)
        assert proc.returncode == 1
        assert f"Cannot reach Redis at redis://127.0.0.1:{port}" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_sentinel_urls_are_accepted_and_their_passwords_never_shown(tmp_path: Path) -> None:
    ports = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    url = f"redis+sentinel://:s3cret@{ports}/svc?sentinel_password=t0psecret"
    for args in (["node", "--redis", url], ["status", "--address", url]):
        proc = redray_cli(*args, tmpdir=tmp_path, check=False)
        assert proc.returncode == 1, proc.stderr  # understood, but nothing answers there
        assert f"Cannot reach Redis at redis+sentinel://:***@{ports}/svc" in proc.stderr
        assert "s3cret" not in proc.stderr and "t0psecret" not in proc.stderr
        assert "Traceback" not in proc.stderr


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        proc = redray_cli("start", "--head", "--port", str(port), tmpdir=tmp_path, check=False)
    assert proc.returncode == 2
    assert f"Port {port} on 127.0.0.1 is already in use" in proc.stderr


def test_help_lists_every_command_without_importing_the_capabilities() -> None:
    """`redray --help` (and `redray start`) stay quick: the jobs, queues, state and dashboard
    commands are listed, and imported only when one of them runs; each resolves to a real
    command. `import redray` itself loads neither asyncio nor redis."""
    script = """
import json, sys
import click
import redray
light = sorted(m for m in ("asyncio", "redis") if m in sys.modules)
from redray import cli
with click.Context(cli.cli) as ctx:
    listed = cli.cli.list_commands(ctx)
    try:
        cli.cli.main(["--help"], standalone_mode=False)
    except SystemExit:
        pass
    loaded = sorted(m for m in sys.modules if m.startswith(
        ("redray.celery", "redray.durable", "redray.jobs", "redray.state", "redray.dashboard.token_cli")))
    resolved = {name: cli.cli.get_command(ctx, name).name for name in listed}
print(json.dumps({"light": light, "listed": listed, "loaded": loaded, "resolved": resolved}))
"""
    out = last_json(run_driver(script).stdout)
    assert out["light"] == []
    assert out["loaded"] == []
    expected = {"start", "node", "status", "stop", "job", "queue", "worker", "list", "get"}
    assert expected | {"summary", "logs", "timeline", "dashboard-token"} <= set(out["listed"])
    assert out["resolved"] == {name: name for name in out["listed"]}
