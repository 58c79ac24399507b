"""A node's side of runtime environments: packages unpacked once into the node's cache and
one virtualenv per distinct requirement set, built once; what a worker or a job entrypoint
for the environment starts with (`Prepared`).

Thread-safety: one lock guards the table of environments; each is built on a thread of its
own (downloads and installers never run on the raylet's reactor thread), and whoever asked
is called back when it is ready or has failed. A failure is remembered for FAILURE_MEMORY
seconds (asking again at once would fail the same way), then tried afresh.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redray
from redray.exceptions import RuntimeEnvSetupError
from redray.gcs import Gcs
from redray.runtime_env import keys, spec

log = logging.getLogger(__name__)

FAILURE_MEMORY = 10.0
INSTALLER_TAIL_LINES = 20
READY_MARK = ".redray-ready"  # written last in a built virtualenv


@dataclass(frozen=True)
class Prepared:
    """How to start a process in a prepared environment."""

    cwd: str | None = None  # the working_dir
    paths: tuple[str, ...] = ()  # put first on sys.path (working_dir, py_modules)
    python: str | None = None  # a virtualenv's interpreter (None: the node's own)

    def environ(self, base: dict[str, str]) -> dict[str, str]:
        """base with PYTHONPATH (and for a virtualenv, VIRTUAL_ENV and PATH) set."""
        env = dict(base)
        if self.paths:
            env["PYTHONPATH"] = os.pathsep.join(
                [*self.paths, *filter(None, [base.get("PYTHONPATH")])]
            )
        if self.python:
            bin_dir = os.path.dirname(self.python)
            env["VIRTUAL_ENV"] = os.path.dirname(bin_dir)
            env["PATH"] = os.pathsep.join([bin_dir, *filter(None, [base.get("PATH")])])
        return env


@dataclass
class _Env:
    waiters: list[Callable[[Prepared | None, str | None], None]] = field(default_factory=list)
    prepared: Prepared | None = None
    error: str | None = None
    failed_at: float = 0.0
    building: bool = False


class NodeEnvs:
    """The runtime environments of one node, prepared on demand and cached on disk."""

    def __init__(self, gcs: Gcs, cache_dir: str):
        self.gcs = gcs
        self.cache = Path(cache_dir)
        self._lock = threading.Lock()
        self._envs: dict[str, _Env] = {}
        self._venv_locks: dict[str, threading.Lock] = {}  # envs may share a requirement set

    def prepare(
        self, runtime_env: dict, done: Callable[[Prepared | None, str | None], None]
    ) -> None:
        """Call done(prepared, None) once the env is ready, or done(None, error message);
        at once (on this thread) when it is known, else from the building thread."""
        key = spec.digest(spec.setup_part(runtime_env))
        with self._lock:
            env = self._envs.setdefault(key, _Env())
            if env.prepared is not None:
                result = (env.prepared, None)
            elif env.error is not None and time.monotonic() - env.failed_at < FAILURE_MEMORY:
                result = (None, env.error)
            else:
                result = None
                env.waiters.append(done)
                if not env.building:
                    env.building, env.error = True, None
                    threading.Thread(
                        target=self._build,
                        args=(key, runtime_env),
                        daemon=True,
                        name="runtime-env-setup",
                    ).start()
        if result is not None:
            done(*result)

    def prepare_blocking(self, runtime_env: dict) -> Prepared:
        """The prepared env (RuntimeEnvSetupError if it cannot be set up)."""
        finished = threading.Event()
        outcome: list = []

        def done(prepared: Prepared | None, error: str | None) -> None:
            outcome.extend((prepared, error))
            finished.set()

        self.prepare(runtime_env, done)
        finished.wait()
        prepared, error = outcome
        if prepared is None:
            raise RuntimeEnvSetupError(error)
        return prepared

    def _build(self, key: str, runtime_env: dict) -> None:
        try:
            prepared, error = self._set_up(runtime_env), None
        except RuntimeEnvSetupError as exc:
            prepared, error = None, str(exc)
        except Exception as exc:  # a bug or a full disk: the caller must still hear of it
            log.exception("runtime_env setup failed")
            prepared, error = None, f"{type(exc).__name__}: {exc}"
        with self._lock:
            env = self._envs[key]
            env.building = False
            env.prepared, env.error = prepared, error
            env.failed_at = time.monotonic()
            waiters, env.waiters = env.waiters, []
        for done in waiters:
            try:
                done(prepared, error)
            except Exception:
                log.exception("runtime_env setup callback failed")

    def _set_up(self, runtime_env: dict) -> Prepared:
        deadline_s = spec.setup_timeout(runtime_env)
        deadline = None if deadline_s is None else time.monotonic() + deadline_s
        cwd = None
        paths: list[str] = []
        if runtime_env.get("working_dir"):
            cwd = self._unpack(runtime_env["working_dir"], "working_dir")
            paths.append(cwd)
        for uri in runtime_env.get("py_modules") or ():
            paths.append(self._unpack(uri, "py_modules"))
        python = None
        if runtime_env.get("pip"):
            python = self._virtualenv(runtime_env["pip"]["packages"], deadline, deadline_s)
        return Prepared(cwd, tuple(paths), python)

    # -- packages ---------------------------------------------------------------------------
    def _unpack(self, uri: str, field_name: str) -> str:
        """The directory a package is unpacked into (once per node)."""
        content = spec.uri_digest(uri)
        if content is None:
            raise RuntimeEnvSetupError(f"runtime_env[{field_name!r}]: unsupported URI {uri!r}")
        dest = self.cache / "packages" / content
        if dest.is_dir():  # (made by one rename once complete)
            return str(_single_top_dir(dest) if field_name == "working_dir" else dest)
        data = keys.get_package(self.gcs, content)
        if data is None:
            raise RuntimeEnvSetupError(
                f"runtime_env[{field_name!r}]: the package {uri} is not in the cluster's Redis "
                "(it was never uploaded to this cluster, or was deleted)."
            )
        if hashlib.sha256(data).hexdigest()[:32] != content:
            raise RuntimeEnvSetupError(f"runtime_env[{field_name!r}]: package {uri} is corrupt.")
        staging = dest.with_name(f"{content}.{os.getpid()}.{threading.get_ident()}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True, mode=0o700)
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                archive.extractall(staging)
        except zipfile.BadZipFile as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise RuntimeEnvSetupError(f"runtime_env[{field_name!r}]: {uri}: {exc}") from None
        try:
            staging.rename(dest)
        except OSError:  # unpacked meanwhile by another process sharing the cache
            shutil.rmtree(staging, ignore_errors=True)
        return str(_single_top_dir(dest) if field_name == "working_dir" else dest)

    # -- pip --------------------------------------------------------------------------------
    def _virtualenv(self, packages: list[str], deadline: float | None, limit: float | None) -> str:
        """The interpreter of the virtualenv for this requirement set, built once: it sees
        the node's own packages (redray among them) behind its own."""
        name = spec.digest({"pip": packages, "python": sys.version, "exe": sys.executable})
        with self._lock:
            lock = self._venv_locks.setdefault(name, threading.Lock())
        with lock:
            return self._build_virtualenv(name, packages, deadline, limit)

    def _build_virtualenv(
        self, name: str, packages: list[str], deadline: float | None, limit: float | None
    ) -> str:
        venv = self.cache / "pip" / name
        python = venv / "bin" / "python"
        if (venv / READY_MARK).exists():
            return str(python)
        shutil.rmtree(venv, ignore_errors=True)  # a build cut short
        venv.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        requirements = venv.parent / f"{name}.requirements.txt"
        requirements.write_text("\n".join(packages) + "\n")
        uv = shutil.which("uv")
        if uv:
            steps = [
                [uv, "venv", "--python", sys.executable, "--system-site-packages", str(venv)],
                [uv, "pip", "install", "--python", str(python), "-r", str(requirements)],
            ]
        elif _pip_has_python_option():  # this pip installs into the venv: no pip copied in
            steps = [
                [sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)],
                [
                    sys.executable, "-m", "pip", "--python", str(python), "install",
                    "--disable-pip-version-check", "-r", str(requirements),
                ],
            ]  # fmt: skip
        else:
            steps = [
                [sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                [
                    str(python), "-m", "pip", "install", "--disable-pip-version-check",
                    "-r", str(requirements),
                ],
            ]  # fmt: skip
        for index, command in enumerate(steps):
            self._run_installer(command, packages, deadline, limit)
            if index == 0:
                _inherit_node_packages(venv)
        (venv / READY_MARK).touch()
        return str(python)

    @staticmethod
    def _run_installer(
        command: list[str], packages: list[str], deadline: float | None, limit: float | None
    ) -> None:
        timeout = None if deadline is None else max(0.1, deadline - time.monotonic())
        try:
            result = subprocess.run(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=timeout,
                text=True,
                errors="replace",
            )
        except subprocess.TimeoutExpired:
            raise RuntimeEnvSetupError(
                f"Installing runtime_env pip packages {packages} took longer than "
                f"setup_timeout_seconds={limit:g}."
            ) from None
        if result.returncode != 0:
            tail = "\n".join(result.stdout.strip().splitlines()[-INSTALLER_TAIL_LINES:])
            raise RuntimeEnvSetupError(
                f"Failed to install runtime_env pip packages {packages} "
                f"({os.path.basename(command[0])} exited with {result.returncode}):\n{tail}"
            )


def _pip_has_python_option() -> bool:
    """pip >= 22.3 can install into another interpreter's environment (`--python`)."""
    try:
        version = importlib.metadata.version("pip")
    except importlib.metadata.PackageNotFoundError:
        return False
    parts = [int(p) if p.isdigit() else 0 for p in version.split(".")[:2]]
    return tuple(parts + [0] * (2 - len(parts))) >= (22, 3)


def _single_top_dir(dest: Path) -> Path:
    """A zip holding one top-level directory is that directory's content (as Ray)."""
    entries = list(dest.iterdir())
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return dest


def _inherit_node_packages(venv: Path) -> None:
    """Let the virtualenv import what this node's interpreter imports (redray and its
    dependencies, whatever installed them), after its own packages."""
    site_dirs = list(venv.glob("lib/python*/site-packages"))
    if not site_dirs:
        return
    parents = [os.path.dirname(os.path.dirname(os.path.abspath(redray.__file__)))]
    parents += [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    (site_dirs[0] / "_redray_node_packages.pth").write_text(
        "\n".join(dict.fromkeys(parents)) + "\n"
    )
