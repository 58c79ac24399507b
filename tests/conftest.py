"""Shared fixtures: real clusters (real redis-server, raylet, worker processes), helpers.

Clusters are expensive enough to share. `ray_start` (2 CPUs), `ray_start_1cpu` and
`ray_start_gpu_custom` each make sure the cluster of this process has their shape, starting
it (and stopping a cluster of another shape) only when needed; whatever cluster is running is
shut down at the end of each test module, so modules never see each other's workers.
Tests that need their own cluster life cycle run a driver in a subprocess (`run_driver`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import redray

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent

# Workers unpickle functions and classes defined in test modules by reference (cloudpickle
# pickles importable modules' classes by name), so the test modules must be importable in
# the worker processes, which inherit the environment of the raylet the driver starts.
# (Ray itself only ships the driver script's directory and cwd to workers, which would not
# cover pytest's `tests/` either.)
_pythonpath = os.environ.get("PYTHONPATH", "")
if str(TESTS_DIR) not in _pythonpath.split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_DIR), _pythonpath) if p)
for _var in ("REDRAY_ADDRESS", "RAY_ADDRESS"):
    os.environ.pop(_var, None)


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.01,
    message: str | None = None,
) -> Any:
    """Poll predicate until it returns something truthy (returned); fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(message or f"condition not met within {timeout} s: {predicate}")
        time.sleep(interval)


def count_lines(path: Path | str) -> int:
    """Lines in a file (0 if it does not exist): attempt counters written by tasks."""
    try:
        with open(path) as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


# -- clusters shared by the tests of a module ----------------------------------------------
_cluster: dict[str, Any] = {"shape": None, "context": None}


def _ensure_cluster(**kwargs: Any) -> Any:
    """Make the cluster of this process the one described by kwargs; return init's context."""
    shape = json.dumps(kwargs, sort_keys=True)
    if redray.is_initialized() and _cluster["shape"] == shape:
        return _cluster["context"]
    _shutdown_cluster()
    _cluster["context"] = redray.init(**kwargs)
    _cluster["shape"] = shape
    return _cluster["context"]


def _shutdown_cluster() -> None:
    if redray.is_initialized():
        redray.shutdown()
    _cluster["shape"] = _cluster["context"] = None


@pytest.fixture(autouse=True, scope="module")
def _cluster_per_module():
    """Whatever cluster a module's tests started is gone when the module is done."""
    yield
    _shutdown_cluster()


@pytest.fixture
def ray_start():
    """A private cluster with 2 CPUs."""
    return _ensure_cluster(num_cpus=2)


@pytest.fixture
def ray_start_1cpu():
    """A private cluster with a single CPU."""
    return _ensure_cluster(num_cpus=1)


@pytest.fixture
def ray_start_gpu_custom():
    """2 CPUs, 2 (pretend) GPUs and 2 units of the custom resource "custom"."""
    return _ensure_cluster(num_cpus=2, num_gpus=2, resources={"custom": 2})


# -- blocking tasks without sleeping --------------------------------------------------------
class Gate:
    """A file-system event usable from tasks: tasks wait for `open()`, tests wait for marks."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.release_file = str(self.dir / "release")

    def open(self) -> None:
        Path(self.release_file).touch()

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def wait_mark(self, name: str, timeout: float = 20.0) -> str:
        """Wait until a task created the file `name`; returns its content."""
        path = self.dir / name
        wait_for(path.exists, timeout, message=f"{name} was never written by the task")
        return path.read_text()  # written atomically by mark()


def block_until(release_file: str, timeout: float = 60.0) -> bool:
    """Inside a task: wait until the gate opens (True) or the timeout passes (False)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(release_file):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def mark(path: str, text: str = "") -> None:
    """Inside a task: create a file atomically (so readers never see it half written)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@pytest.fixture
def gate(tmp_path):
    g = Gate(tmp_path / "gate")
    yield g
    g.open()  # never leave a task blocked on a gate


# -- drivers in their own process ------------------------------------------------------------
def run_driver(
    script: str,
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run a driver script in a fresh interpreter; returns the completed process (text)."""
    full_env = dict(os.environ)
    full_env.pop("REDRAY_ADDRESS", None)
    full_env.pop("RAY_ADDRESS", None)
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), full_env.get("PYTHONPATH", "")) if p
    )
    if env:
        full_env.update(env)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=cwd,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"driver exited with {proc.returncode}\n--- stdout\n{proc.stdout}\n"
            f"--- stderr\n{proc.stderr}"
        )
    return proc


def last_json(stdout: str) -> Any:
    """The last line of a driver's stdout that is a JSON document."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith(("{", "[")):
            return json.loads(line)
    raise AssertionError(f"no JSON line in driver output:\n{stdout}")


def redray_shm_files() -> set[str]:
    try:
        return {name for name in os.listdir("/dev/shm") if "redray" in name}
    except FileNotFoundError:
        return set()
