"""`init()` and `shutdown()`: argument checks, connecting, and a clean teardown.

Drivers with a cluster life cycle of their own run in subprocesses (`run_driver`), each with a
TMPDIR of its own so that `address="auto"` never finds a developer's cluster.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from urllib.parse import urlsplit

import psutil
import pytest
from conftest import REPO, last_json, redray_shm_files, run_driver, wait_for

import redray
from redray.node.redis_server import RedisServer, free_port


@pytest.fixture
def isolated(tmp_path):
    """Environment for a driver whose TMPDIR (and so current-cluster file) is its own."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    return {"TMPDIR": str(tmp)}


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def port_open(address) -> bool:
    try:
        with socket.create_connection(tuple(address), timeout=0.5):
            return True
    except OSError:
        return False


# -- arguments --------------------------------------------------------------------------------
def test_unknown_keyword_is_a_type_error_naming_it():
    try:
        with pytest.raises(TypeError, match="num_cpu"):
            redray.init(num_cpu=2)
        with pytest.raises(TypeError, match="bogus_option"):
            redray.init(num_cpus=1, bogus_option=True)
        assert not redray.is_initialized()
    finally:
        redray.shutdown()


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"resources": {"CPU": 2}}, ValueError),
        ({"resources": {"GPU": 1}}, ValueError),
        ({"resources": ["custom"]}, TypeError),
        ({"runtime_env": {"conda": "env"}}, ValueError),
        ({"runtime_env": "not a dict"}, TypeError),
        ({"_node_ip_address": "0.0.0.0"}, ValueError),
        ({"_node_ip_address": "not-an-ip"}, ValueError),
    ],
)
def test_bad_init_arguments(kwargs, error):
    try:
        with pytest.raises(error):
            redray.init(**kwargs)
        assert not redray.is_initialized()
    finally:
        redray.shutdown()


# -- life cycle ------------------------------------------------------------------------------
def test_is_initialized_init_shutdown_init_again(isolated):
    out = run_driver(
        """
        import json, redray

        @redray.remote
        def square(x):
            return x * x

        states = [redray.is_initialized()]
        ctx = redray.init(num_cpus=1)
        states.append(redray.is_initialized())
        first = redray.get([square.remote(i) for i in range(10)])
        info = {k: ctx[k] for k in ("node_id", "job_id", "gcs_address")}
        redray.shutdown()
        states.append(redray.is_initialized())
        redray.shutdown()  # a second shutdown is harmless
        ctx2 = redray.init(num_cpus=1)
        second = redray.get(square.remote(12))
        redray.shutdown()
        print(json.dumps({"states": states, "first": first, "second": second,
                          "info": info, "node2": ctx2["node_id"]}))
        """,
        env=isolated,
    ).stdout
    result = last_json(out)
    assert result["states"] == [False, True, False]
    assert result["first"] == [i * i for i in range(10)]
    assert result["second"] == 144
    assert result["info"]["gcs_address"].startswith("redis://")
    assert result["info"]["node_id"] and result["info"]["job_id"]
    assert result["node2"] != result["info"]["node_id"]  # a fresh private cluster


def test_double_init_and_ignore_reinit_error(isolated):
    out = run_driver(
        """
        import json, redray

        ctx = redray.init(num_cpus=1)
        try:
            redray.init(num_cpus=1)
            error = None
        except RuntimeError as exc:
            error = str(exc)
        again = redray.init(ignore_reinit_error=True)

        @redray.remote
        def one():
            return 1

        value = redray.get(one.remote())
        print(json.dumps({"error": error, "same_node": again["node_id"] == ctx["node_id"],
                          "same_job": again["job_id"] == ctx["job_id"], "value": value}))
        """,
        env=isolated,
    ).stdout
    result = last_json(out)
    assert result["error"] and "ignore_reinit_error" in result["error"]
    assert result["same_node"] and result["same_job"]
    assert result["value"] == 1


def test_init_as_context_manager(isolated):
    out = run_driver(
        """
        import json, redray

        with redray.init(num_cpus=1) as ctx:
            inside = redray.is_initialized()
            value = redray.get(redray.put("in"))
        print(json.dumps({"inside": inside, "after": redray.is_initialized(), "value": value}))
        """,
        env=isolated,
    ).stdout
    assert last_json(out) == {"inside": True, "after": False, "value": "in"}


def test_first_remote_call_starts_a_cluster(isolated):
    """As in Ray, using the API without init() starts a private cluster."""
    out = run_driver(
        """
        import json, redray

        @redray.remote
        def double(x):
            return 2 * x

        value = redray.get(double.remote(21))
        print(json.dumps({"value": value, "initialized": redray.is_initialized()}))
        """,
        env=isolated,
    ).stdout
    assert last_json(out) == {"value": 42, "initialized": True}


def test_init_to_first_result_is_quick(isolated):
    """Start-up is well under a second on a developer machine; allow slack for CI load."""
    out = run_driver(
        """
        import json, time
        start = time.perf_counter()
        import redray

        redray.init(num_cpus=1)

        @redray.remote
        def one():
            return 1

        assert redray.get(one.remote()) == 1
        print(json.dumps({"seconds": time.perf_counter() - start}))
        redray.shutdown()
        """,
        env=isolated,
    ).stdout
    assert last_json(out)["seconds"] < 3.0


def test_job_runtime_env_applies_to_tasks(isolated):
    out = run_driver(
        """
        import json, os, redray

        redray.init(num_cpus=1, runtime_env={"env_vars": {"JOB_LEVEL_VAR": "from-init"}})

        @redray.remote
        def read():
            return os.environ.get("JOB_LEVEL_VAR")

        print(json.dumps({"value": redray.get(read.remote())}))
        """,
        env=isolated,
    ).stdout
    assert last_json(out) == {"value": "from-init"}


# -- JobConfig -----------------------------------------------------------------------------------
def test_job_config_has_rays_constructor():
    from redray.job_config import JobConfig

    assert list(inspect.signature(JobConfig).parameters) == [
        "jvm_options",
        "code_search_path",
        "runtime_env",
        "_client_job",
        "metadata",
        "ray_namespace",
        "default_actor_lifetime",
        "_disable_job_level_lineage_reconstruction",
        "_py_driver_sys_path",
    ]
    config = JobConfig(metadata={"a": "1"})
    config.set_metadata("b", "2")
    assert config.metadata == {"a": "1", "b": "2"}
    assert config.runtime_env == {} and config.default_actor_lifetime == "non_detached"
    with pytest.raises(ValueError):
        JobConfig(default_actor_lifetime="forever")
    with pytest.raises(TypeError):
        JobConfig(code_search_path="/not/a/list")


def test_init_honours_the_job_config(isolated, tmp_path):
    """runtime_env, namespace, metadata (kept with the job) and code_search_path apply."""
    library = tmp_path / "library"
    library.mkdir()
    (library / "job_helper_module.py").write_text("VALUE = 42\n")
    out = run_driver(
        f"""
        import json, os, redray
        from redray.core import context
        from redray.job_config import JobConfig

        redray.init(
            num_cpus=1,
            job_config=JobConfig(
                runtime_env={{"env_vars": {{"FROM_JOB_CONFIG": "yes"}}}},
                ray_namespace="team-a",
                metadata={{"owner": "alice"}},
                code_search_path=[{str(library)!r}],
            ),
        )

        @redray.remote
        def probe():
            import job_helper_module

            return os.environ.get("FROM_JOB_CONFIG"), job_helper_module.VALUE

        worker = context.current
        print(json.dumps({{
            "probe": redray.get(probe.remote(), timeout=30),
            "namespace": redray.get_runtime_context().namespace,
            "metadata": worker.gcs.jobs()[worker.job_id]["metadata"],
        }}))
        """,
        env=isolated,
    ).stdout
    assert last_json(out) == {
        "probe": ["yes", 42],
        "namespace": "team-a",
        "metadata": {"owner": "alice"},
    }


def test_init_arguments_win_over_the_job_config(isolated):
    out = run_driver(
        """
        import json, os, redray
        from redray.job_config import JobConfig

        config = JobConfig(runtime_env={"env_vars": {"V": "job"}}, ray_namespace="job-ns")
        redray.init(
            num_cpus=1,
            job_config=config,
            namespace="init-ns",
            runtime_env={"env_vars": {"V": "init"}},
        )

        @redray.remote
        def read():
            return os.environ.get("V")

        print(json.dumps([redray.get(read.remote()), redray.get_runtime_context().namespace]))
        """,
        env=isolated,
    ).stdout
    assert last_json(out) == ["init", "init-ns"]


@pytest.mark.parametrize(
    "config, error",
    [
        ({"default_actor_lifetime": "detached"}, ValueError),
        ({"jvm_options": ["-Xmx1g"]}, ValueError),
        ({"runtime_env": {"conda": "env"}}, ValueError),
        (None, TypeError),
    ],
)
def test_job_config_settings_redray_cannot_honour_are_refused(config, error):
    from redray.job_config import JobConfig

    job_config = {"not": "a JobConfig"} if config is None else JobConfig(**config)
    try:
        with pytest.raises(error):
            redray.init(num_cpus=1, job_config=job_config)
        assert not redray.is_initialized()
    finally:
        redray.shutdown()


# -- connecting to existing clusters ----------------------------------------------------------
def test_address_auto_without_a_cluster_is_a_connection_error(isolated):
    out = run_driver(
        """
        import json, redray
        try:
            redray.init(address="auto")
            result = {"error": None}
        except ConnectionError as exc:
            result = {"error": str(exc)}
        result["initialized"] = redray.is_initialized()
        print(json.dumps(result))
        """,
        env=isolated,
    ).stdout
    result = last_json(out)
    assert result["error"] and "redray start" in result["error"]
    assert result["initialized"] is False


@pytest.fixture
def bare_redis(tmp_path):
    server = RedisServer.start(port=0, directory=str(tmp_path))
    server.wait_ready()
    yield server
    server.stop()


def test_address_of_redis_without_a_cluster_is_a_connection_error(bare_redis):
    try:
        with pytest.raises(ConnectionError):
            redray.init(address=bare_redis.url)
        assert not redray.is_initialized()
    finally:
        redray.shutdown()


@pytest.mark.parametrize("scheme", ["redis", "redis+sentinel"])
def test_unreachable_address_is_a_connection_error(scheme):
    address = f"{scheme}://127.0.0.1:{free_port()}" + ("/mymaster" if "sentinel" in scheme else "")
    try:
        with pytest.raises(ConnectionError, match="Could not reach") as caught:
            redray.init(address=address)
        assert address in str(caught.value)  # taken as it is, not as redis://redis+sentinel://
        assert not redray.is_initialized()
    finally:
        redray.shutdown()


@pytest.mark.timeout(90)
def test_second_driver_connects_by_redis_url(isolated):
    """A driver joins the private cluster of another driver by its redis:// address."""
    first = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
                import json, sys, redray
                ctx = redray.init(num_cpus=2)
                print(json.dumps({"url": ctx["gcs_address"], "node": ctx["node_id"],
                                  "job": ctx["job_id"]}), flush=True)
                sys.stdin.read()  # until the test is done with us
                redray.shutdown()
                """
            ),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **isolated, "PYTHONPATH": f"{REPO}{os.pathsep}"},
    )
    try:
        head = json.loads(first.stdout.readline())
        out = run_driver(
            f"""
            import json, os, redray

            try:
                redray.init(address={head["url"]!r}, num_cpus=1)
                extra = None
            except ValueError as exc:
                extra = str(exc)
            ctx = redray.init(address={head["url"]!r})

            @redray.remote
            def where():
                return redray.get_runtime_context().get_node_id()

            print(json.dumps({{"extra": extra, "job": ctx["job_id"],
                              "nodes": [n["NodeID"] for n in redray.nodes()],
                              "ran_on": redray.get(where.remote(), timeout=30)}}))
            redray.shutdown()
            """,
            env=isolated,
        ).stdout
        result = last_json(out)
        assert result["extra"] and "num_cpus" in result["extra"]
        assert result["nodes"] == [head["node"]]
        assert result["ran_on"] == head["node"]
        assert result["job"] != head["job"]
    finally:
        first.stdin.close()
        first.wait(30)
    assert first.returncode == 0


@pytest.mark.timeout(120)
@pytest.mark.skipif(
    importlib.util.find_spec("redray.cli") is None, reason="redray/cli.py does not exist yet"
)
def test_init_with_address_of_cli_cluster(isolated):
    port = free_port()
    env = {**os.environ, **isolated}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)

    def cli(*args, check=True):
        proc = subprocess.run(
            [sys.executable, "-m", "redray.cli", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        if check:
            assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    try:
        cli("start", "--head", "--port", str(port), "--num-cpus", "1")
        record_file = os.path.join(
            isolated["TMPDIR"], f"redray-{os.getuid()}", "current_cluster.json"
        )
        url = json.load(open(record_file))["gcs_url"]
        assert f":{port}" in url
        script = """
            import json, redray
            redray.init(address=ADDRESS)

            @redray.remote
            def square(x):
                return x * x

            print(json.dumps({"squares": redray.get([square.remote(i) for i in range(5)]),
                              "cpus": redray.cluster_resources()["CPU"]}))
            redray.shutdown()
            """
        for address in (url, "auto"):
            out = run_driver(script.replace("ADDRESS", repr(address)), env=isolated).stdout
            assert last_json(out) == {"squares": [0, 1, 4, 9, 16], "cpus": 1.0}
    finally:
        cli("stop", check=False)


# -- nothing left behind -----------------------------------------------------------------------
SPAWN_AND_LIST = """
    import json, os, time
    import numpy as np
    import psutil
    import redray

    ctx = redray.init(num_cpus=2)

    @redray.remote
    def work(n):
        return np.ones(n)

    arrays = redray.get([work.remote(200_000) for _ in range(4)])  # via shared memory
    big = redray.put(np.ones(1 << 20))
    node = redray.nodes()[0]
    procs = psutil.Process().children(recursive=True)
    listing = {
        "pids": [p.pid for p in procs],
        "cmds": [" ".join(p.cmdline()) for p in procs],
        "session_dir": ctx["session_dir"],
        "raylet": [node["NodeManagerAddress"], node["NodeManagerPort"]],
        "gcs": ctx["gcs_address"],
    }
    print(json.dumps(listing), flush=True)
"""


def check_listing(listing) -> None:
    """The driver really had a cluster: raylet, embedded Redis and worker processes."""
    cmds = listing["cmds"]
    assert any("redray.raylet" in c for c in cmds), cmds
    assert any("redis-server" in c for c in cmds), cmds
    assert len(cmds) >= 4, cmds  # raylet, redis-server, zygote, workers
    password = urlsplit(listing["gcs"]).password
    assert password and not [c for c in cmds if password in c], "the password shows in ps"


@pytest.mark.timeout(60)
def test_shutdown_leaves_no_process_and_no_shared_memory(isolated):
    shm_before = redray_shm_files()
    out = run_driver(
        SPAWN_AND_LIST
        + """
    del arrays, big
    redray.shutdown()
    # Checked while this driver still lives: nothing may rely on our exit to clean up.
    deadline = time.monotonic() + 10
    def running(p):
        try:
            return p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    while any(running(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.02)
    print(json.dumps({"left": [p.pid for p in procs if running(p)],
                      "session_dir_exists": os.path.exists(listing["session_dir"]),
                      "initialized": redray.is_initialized()}))
    """,
        env=isolated,
    ).stdout
    listing = json.loads(out.splitlines()[0])
    check_listing(listing)
    result = last_json(out)
    assert result["left"] == []
    assert result["initialized"] is False
    assert result["session_dir_exists"] is False
    assert redray_shm_files() - shm_before == set()
    assert not port_open(listing["raylet"])
    assert not any(running(pid) for pid in listing["pids"])


@pytest.mark.timeout(60)
def test_exit_without_shutdown_leaves_nothing(isolated):
    shm_before = redray_shm_files()
    out = run_driver(SPAWN_AND_LIST, env=isolated).stdout  # exits without shutdown()
    listing = last_json(out)
    check_listing(listing)
    wait_for(lambda: not any(running(pid) for pid in listing["pids"]), timeout=15)
    assert not port_open(listing["raylet"])
    assert not os.path.exists(listing["session_dir"])
    assert redray_shm_files() - shm_before == set()


@pytest.mark.timeout(60)
def test_sigkilled_driver_leaves_nothing(isolated):
    """Even a driver killed with SIGKILL (no atexit) takes its private cluster with it."""
    shm_before = redray_shm_files()
    env = {**os.environ, **isolated}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    driver = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(SPAWN_AND_LIST) + "\nimport sys\nsys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        listing = json.loads(driver.stdout.readline())
        check_listing(listing)
        driver.send_signal(signal.SIGKILL)
        driver.wait(10)
        wait_for(lambda: not any(running(pid) for pid in listing["pids"]), timeout=15)
        assert not port_open(listing["raylet"])
        assert redray_shm_files() - shm_before == set()
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        driver.stdin.close()
        driver.stdout.close()


@pytest.mark.timeout(60)
def test_temp_dir_holds_the_session_of_a_private_cluster(isolated, tmp_path):
    temp_dir = tmp_path / "redray-temp"
    result = last_json(
        run_driver(
            f"""
            import json, os, redray
            ctx = redray.init(num_cpus=1, _temp_dir={str(temp_dir)!r})
            session = ctx["session_dir"]
            logs = os.listdir(os.path.join(session, "logs"))
            redray.shutdown()
            print(json.dumps({{"session": session, "logs": logs,
                               "left": os.path.exists(session)}}))
            """,
            env=isolated,
        ).stdout
    )
    assert os.path.dirname(result["session"]) == str(temp_dir)
    assert "raylet.log" in result["logs"]
    assert result["left"] is False and temp_dir.is_dir()


# -- the temp root: only a directory of our own ------------------------------------------------
NOBODY = 65534


def plant_temp_root(path, how: str, tmp_path) -> str:
    """A temp root at path that another user could write (or a symlink): what a hostile
    neighbour on a shared /tmp creates first. Returns the directory whatever would be written
    there lands in."""
    if how == "symlink":
        target = tmp_path / "symlink-target"
        target.mkdir(mode=0o700)
        path.symlink_to(target)
        return str(target)
    path.mkdir()
    if how == "world-writable":
        path.chmod(0o777)
    elif how == "group-writable":
        path.chmod(0o770)
    else:
        os.chown(path, NOBODY, NOBODY)
        path.chmod(0o700)  # (we are root: we could write it, but it is not ours)
    return str(path)


UNSAFE = pytest.mark.parametrize(
    "how, problem",
    [
        ("world-writable", "writable by other users"),
        ("group-writable", "writable by other users"),
        pytest.param(
            "another-user",
            "belongs to",
            marks=pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown"),
        ),
        ("symlink", "is a symbolic link"),
    ],
)

TRY_INIT = """
    import json, redray
    try:
        redray.init(ARGS)
        result = {"error": None}
    except Exception as exc:
        result = {"error": str(exc), "type": type(exc).__name__,
                  "is_permission_error": isinstance(exc, PermissionError)}
    result["initialized"] = redray.is_initialized()
    redray.shutdown()
    print(json.dumps(result))
    """


def assert_refused(result: dict, path, problem: str) -> None:
    assert result["initialized"] is False and result["error"], result
    assert result["is_permission_error"], result
    assert f"refusing to use {path}" in result["error"] and problem in result["error"], result


@UNSAFE
@pytest.mark.timeout(60)
def test_init_refuses_a_temp_dir_another_user_could_write(how, problem, isolated, tmp_path):
    temp_dir = tmp_path / "temp-root"
    landing = plant_temp_root(temp_dir, how, tmp_path)
    script = TRY_INIT.replace("ARGS", f"num_cpus=1, _temp_dir={str(temp_dir)!r}")
    assert_refused(last_json(run_driver(script, env=isolated).stdout), temp_dir, problem)
    assert os.listdir(landing) == [], "something was written into the refused temp dir"


@UNSAFE
@pytest.mark.timeout(60)
def test_the_default_temp_root_made_by_another_user_is_refused(how, problem, tmp_path):
    """<TMPDIR>/redray-<uid> made first by someone else: a private cluster does not start in
    it, and address="auto" does not believe the cluster file planted there (it would send
    the driver's code and data to the planter's cluster)."""
    tmpdir = tmp_path / "shared-tmp"
    tmpdir.mkdir()
    root = tmpdir / f"redray-{os.getuid()}"
    landing = plant_temp_root(root, how, tmp_path)
    env = {"TMPDIR": str(tmpdir)}
    script = TRY_INIT.replace("ARGS", "num_cpus=1")
    assert_refused(last_json(run_driver(script, env=env).stdout), root, problem)
    assert os.listdir(landing) == []
    planted = {"gcs_url": "redis://127.0.0.1:1", "cluster": "default", "pids": [os.getpid()]}
    with open(os.path.join(landing, "current_cluster.json"), "w") as f:
        json.dump(planted, f)
    script = TRY_INIT.replace("ARGS", 'address="auto"')
    assert_refused(last_json(run_driver(script, env=env).stdout), root, problem)


@pytest.mark.timeout(60)
def test_a_planted_cluster_file_in_our_own_root_is_not_believed(isolated):
    """A current-cluster file that is not ours, or that others may write, is refused."""
    root = os.path.join(isolated["TMPDIR"], f"redray-{os.getuid()}")
    os.mkdir(root, 0o700)
    record = os.path.join(root, "current_cluster.json")
    with open(record, "w") as f:
        json.dump({"gcs_url": "redis://127.0.0.1:1", "pids": [os.getpid()]}, f)
    os.chmod(record, 0o666)
    result = last_json(run_driver(TRY_INIT.replace("ARGS", 'address="auto"'), env=isolated).stdout)
    assert result["is_permission_error"] and "refusing to read" in result["error"], result


@pytest.mark.timeout(60)
def test_what_a_private_cluster_writes_only_its_user_can_read(isolated, tmp_path):
    """Directories 0700, files 0600: the temp root, the session, its logs, spilled objects."""
    temp_dir = tmp_path / "fresh-root"
    result = last_json(
        run_driver(
            f"""
            import json, os, stat, numpy as np, redray
            ctx = redray.init(num_cpus=1, object_store_memory=40 * 2**20,
                              _temp_dir={str(temp_dir)!r})
            refs = [redray.put(np.ones(12 * 2**20 // 8)) for _ in range(5)]  # some spill
            session = ctx["session_dir"]
            modes = {{}}
            for where, dirs, files in os.walk({str(temp_dir)!r}):
                modes[where] = stat.S_IMODE(os.lstat(where).st_mode)
                for name in files:
                    path = os.path.join(where, name)
                    modes[path] = stat.S_IMODE(os.lstat(path).st_mode)
            spill = os.path.join(session, "spill")
            spilled = os.path.isdir(spill) and os.listdir(spill)
            redray.shutdown()
            print(json.dumps({{"modes": modes, "spilled": bool(spilled), "session": session}}))
            """,
            env=isolated,
        ).stdout
    )
    modes, session = result["modes"], result["session"]
    assert result["spilled"], "nothing was spilled: the test does not see the spill dir"
    for path in (str(temp_dir), session, f"{session}/logs", f"{session}/spill"):
        assert modes[path] == 0o700, (path, oct(modes[path]))
    assert modes[f"{session}/logs/raylet.log"] == 0o600
    loose = {p: oct(m) for p, m in modes.items() if m & 0o077}
    assert not loose, f"readable or writable by others: {loose}"


# -- init/shutdown cycles and threads left waiting ---------------------------------------------
def check_flat(samples: list[dict], warmup: int = 4) -> None:
    """Threads and fds back to where they were after each cycle; memory does not grow."""
    base = samples[warmup - 1]
    for sample in samples[warmup:]:
        assert sample["threads"] <= base["threads"], (sample, base)
        assert sample["fds"] <= base["fds"], (sample, base)
    # What redray allocates is freed or reused from cycle to cycle: the rest is allocator noise.
    assert samples[-1]["rss_mb"] - base["rss_mb"] < 10, (base, samples[-1])


@pytest.mark.timeout(180)
def test_init_shutdown_cycles_leave_threads_fds_and_memory_flat(isolated):
    """(scripts/init_cycles.py; run it with 1000 cycles for the long measurement)"""
    cycles = 30
    script = REPO / "scripts" / "init_cycles.py"
    out = run_driver(
        f"import runpy, sys\nsys.argv = ['init_cycles', '{cycles}']\n"
        f"runpy.run_path({str(script)!r}, run_name='__main__')",
        env=isolated,
        timeout=170,
    ).stdout
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    samples, left = lines[:-1], lines[-1]["threads_left"]
    assert len(samples) == cycles
    print(f"{cycles} cycles in {samples[-1]['seconds']:.1f} s:", samples[3], samples[-1])
    assert left == ["MainThread"], left
    check_flat(samples)


BLOCKED_AT_SHUTDOWN = """
    import asyncio, json, threading, time
    import redray
    from redray.exceptions import RaySystemError

    redray.init(num_cpus=1)

    @redray.remote
    def forever():
        time.sleep(3600)

    @redray.remote
    def blob(n):
        return b"x" * n

    assert len(redray.get(blob.remote(200_000))) == 200_000  # the store and leases in use
    pending = forever.remote()
    outcomes = {}

    def blocked(name, fn):
        def run():
            try:
                fn()
                outcomes[name] = "returned"
            except RaySystemError as exc:
                outcomes[name] = "RaySystemError: " + str(exc)
            except BaseException as exc:
                outcomes[name] = repr(exc)
        thread = threading.Thread(target=run, name="user-" + name)
        thread.start()
        return thread

    async def awaited():
        return await pending

    threads = [
        blocked("get", lambda: redray.get(pending)),
        blocked("get_many", lambda: redray.get([pending, forever.remote()])),
        blocked("wait", lambda: redray.wait([pending], timeout=None)),
        blocked("future", lambda: pending.future().result()),
        blocked("await", lambda: asyncio.run(awaited())),
    ]
    time.sleep(0.5)  # (nothing to wait for: they block until shutdown, which is the test)
    start = time.monotonic()
    redray.shutdown()
    for thread in threads:
        thread.join(10)
    print(json.dumps({
        "outcomes": outcomes,
        "seconds": time.monotonic() - start,
        "alive": [t.name for t in threading.enumerate() if t is not threading.main_thread()],
    }))
"""


@pytest.mark.timeout(90)
def test_shutdown_wakes_threads_blocked_in_get_wait_and_futures(isolated):
    """Threads waiting for objects when another thread shuts redray down get a
    RaySystemError (instead of waiting forever), and every runtime thread ends."""
    result = last_json(run_driver(BLOCKED_AT_SHUTDOWN, env=isolated, timeout=80).stdout)
    assert result["alive"] == [], result
    assert result["seconds"] < 10, result
    for name in ("get", "get_many", "future", "await"):
        assert result["outcomes"][name].startswith("RaySystemError: "), result["outcomes"]
        assert "redray.shutdown()" in result["outcomes"][name]
    # wait() may also return the refs, whose get would then raise the same error.
    assert result["outcomes"]["wait"] in ("returned",) or result["outcomes"]["wait"].startswith(
        "RaySystemError"
    )
