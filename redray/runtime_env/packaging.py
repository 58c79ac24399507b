"""Turning a driver's local runtime_env into a resolved one: directories zipped (with
.gitignore honoured, .git left out, `excludes` applied), content-addressed, uploaded once.

The size limit is checked on the files chosen, before anything is zipped or sent, and the
error names the largest files and how to leave them out.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

from redray.gcs import Gcs
from redray.runtime_env import keys, spec

MAX_SIZE_ENV = "REDRAY_RUNTIME_ENV_MAX_SIZE"
DEFAULT_MAX_SIZE = 512 * 1024 * 1024  # as Ray's GCS_STORAGE_MAX_SIZE
IGNORE_FILES = (".gitignore", ".rayignore")
ALWAYS_EXCLUDED = (".git",)
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed, so equal content makes equal packages


def max_package_size() -> int:
    """The largest package accepted, in bytes (REDRAY_RUNTIME_ENV_MAX_SIZE)."""
    raw = os.environ.get(MAX_SIZE_ENV)
    if raw is None:
        return DEFAULT_MAX_SIZE
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{MAX_SIZE_ENV} must be a number of bytes, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{MAX_SIZE_ENV} must be positive, got {value}")
    return value


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):.2f}MiB"


def collect_files(root: Path, excludes: list[str]) -> list[tuple[str, Path]]:
    """The files of a directory to ship, as (path relative to root, path), sorted: `.git`
    never, what a .gitignore/.rayignore of the directory or a parent (up to root) ignores,
    and what an `excludes` pattern (gitwildmatch, relative to root) matches."""
    import pathspec  # only drivers shipping a directory need it

    root = root.resolve()
    user_spec = pathspec.GitIgnoreSpec.from_lines(excludes)
    chosen: list[tuple[str, Path]] = []
    # (directory relative to root, its ignore spec) for the directories being walked.
    ignore_specs: dict[str, list[tuple[str, Any]]] = {"": []}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/")
        specs = list(ignore_specs.get(rel_dir, []))
        for name in IGNORE_FILES:
            ignore_file = Path(dirpath) / name
            if ignore_file.is_file():
                lines = ignore_file.read_text(errors="replace").splitlines()
                specs.append((rel_dir, pathspec.GitIgnoreSpec.from_lines(lines)))

        kept_dirs = []
        for name in sorted(dirnames):
            rel = f"{rel_dir}/{name}" if rel_dir else name
            if name in ALWAYS_EXCLUDED or _excluded(rel, True, user_spec, specs):
                continue
            kept_dirs.append(name)
            ignore_specs[rel] = specs
        dirnames[:] = kept_dirs
        for name in sorted(filenames):
            rel = f"{rel_dir}/{name}" if rel_dir else name
            path = Path(dirpath) / name
            if (
                name in ALWAYS_EXCLUDED
                or _excluded(rel, False, user_spec, specs)
                or not path.is_file()
            ):
                continue
            chosen.append((rel, path))
    chosen.sort()
    return chosen


def _excluded(rel: str, is_dir: bool, user_spec: Any, specs: list) -> bool:
    """Whether `excludes` or an ignore file (relative to its own directory) leaves rel out."""
    probe = rel + "/" if is_dir else rel
    if user_spec.match_file(probe):
        return True
    for base, ignore in specs:
        local = probe[len(base) + 1 :] if base else probe
        if ignore.match_file(local):
            return True
    return False


def check_size(what: str, files: list[tuple[str, int]], limit: int) -> None:
    """ValueError naming the largest files when their total is over limit."""
    total = sum(size for _, size in files)
    if total <= limit:
        return
    largest = sorted(files, key=lambda item: -item[1])[:5]
    listing = ", ".join(f"{name} ({_mib(size)})" for name, size in largest)
    first = largest[0][0]
    raise ValueError(
        f"The runtime_env {what} is {_mib(total)}, over the package size limit of "
        f"{_mib(limit)} ({MAX_SIZE_ENV}). Largest files: {listing}. To leave files out, "
        f"list them in a .gitignore of the directory or in runtime_env['excludes'] "
        f"(gitwildmatch patterns, e.g. {{'excludes': [{first!r}]}})."
    )


def zip_directory(root: Path, excludes: list[str], prefix: str = "") -> bytes:
    """A deterministic zip of the files to ship from root (under `prefix/` if given),
    refused with ValueError when over the size limit."""
    files = collect_files(root, excludes)
    sized = [(rel, path.stat().st_size) for rel, path in files]
    check_size(f"directory {str(root)!r}", sized, max_package_size())
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for rel, path in files:
            info = zipfile.ZipInfo(f"{prefix}/{rel}" if prefix else rel, _ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (path.stat().st_mode & 0o777) << 16
            archive.writestr(info, path.read_bytes())
    return buffer.getvalue()


def upload(gcs: Gcs, data: bytes) -> str:
    """Store a package once (content-addressed); its URI."""
    if len(data) > max_package_size():
        raise ValueError(
            f"The runtime_env package is {_mib(len(data))}, over the package size limit of "
            f"{_mib(max_package_size())} ({MAX_SIZE_ENV})."
        )
    content = hashlib.sha256(data).hexdigest()[:32]
    if not keys.has_package(gcs, content):
        keys.put_package(gcs, content, data)
    return spec.package_uri(content)


def _package_path(gcs: Gcs, value: str, excludes: list[str], field: str) -> str:
    """The URI of a working_dir or py_modules entry (a URI already, a dir, a zip or wheel)."""
    if "://" in value:
        if spec.uri_digest(value) is None:
            raise ValueError(
                f"runtime_env[{field!r}] URI {value!r} is not supported: redray takes local "
                "directories, .zip files and wheels (uploaded to the cluster's Redis)."
            )
        return value
    path = Path(value).expanduser()
    if not path.exists():
        raise ValueError(f"runtime_env[{field!r}] {value!r} does not exist.")
    if path.is_dir():
        # py_modules: the package directory itself must be importable, so it is the zip's top.
        prefix = path.resolve().name if field == "py_modules" else ""
        return upload(gcs, zip_directory(path, excludes, prefix))
    if path.suffix in (".zip", ".whl"):
        check_size(f"file {value!r}", [(path.name, path.stat().st_size)], max_package_size())
        return upload(gcs, path.read_bytes())
    raise ValueError(
        f"runtime_env[{field!r}] {value!r} must be a directory, a .zip file"
        + (" or a .whl file." if field == "py_modules" else ".")
    )


def _pip_packages(pip: Any) -> list[str]:
    """The requirement lines of a pip field (a list, a requirements file, or Ray's dict)."""
    if isinstance(pip, dict):
        pip = pip.get("packages") or []
    if isinstance(pip, str):
        path = Path(pip).expanduser()
        if not path.is_file():
            raise ValueError(f"runtime_env['pip'] requirements file {pip!r} does not exist.")
        pip = path.read_text().splitlines()
    lines = [line.strip() for line in pip]
    return [line for line in lines if line and not line.startswith("#")]


def resolve(runtime_env: dict | None, gcs: Gcs) -> dict | None:
    """The resolved form of a checked runtime_env: packages uploaded, paths replaced by URIs."""
    if not runtime_env:
        return runtime_env or None
    resolved: dict[str, Any] = {}
    excludes = list(runtime_env.get("excludes") or [])
    if runtime_env.get("env_vars"):
        resolved["env_vars"] = dict(runtime_env["env_vars"])
    if runtime_env.get("working_dir"):
        resolved["working_dir"] = _package_path(
            gcs, runtime_env["working_dir"], excludes, "working_dir"
        )
    if runtime_env.get("py_modules"):
        resolved["py_modules"] = [
            _package_path(gcs, module, excludes, "py_modules")
            for module in runtime_env["py_modules"]
        ]
    if runtime_env.get("pip"):
        packages = _pip_packages(runtime_env["pip"])
        if packages:
            resolved["pip"] = {"packages": packages}
    if runtime_env.get("config"):
        resolved["config"] = dict(runtime_env["config"])
    return resolved or None


def is_resolved(runtime_env: dict | None) -> bool:
    """Whether every package field is already a URI (nothing to upload)."""
    if not runtime_env or "excludes" in runtime_env:
        return not runtime_env
    entries = [runtime_env.get("working_dir")] + list(runtime_env.get("py_modules") or [])
    pip = runtime_env.get("pip")
    return all(e is None or spec.uri_digest(e) for e in entries) and (
        pip is None or (isinstance(pip, dict) and set(pip) == {"packages"})
    )


_resolved_cache: dict[str, dict | None] = {}
_RESOLVED_CACHE_MAX = 256


def resolve_once(runtime_env: dict | None, gcs: Gcs) -> dict | None:
    """resolve(), remembered per process: a directory is packaged and uploaded once per
    driver, not at every task submission (changes made to it later are not shipped)."""
    if is_resolved(runtime_env):
        return runtime_env or None
    text = json.dumps(runtime_env, sort_keys=True)
    resolved = _resolved_cache.get(text, _MISSING)
    if resolved is _MISSING:
        resolved = resolve(runtime_env, gcs)
        if len(_resolved_cache) >= _RESOLVED_CACHE_MAX:
            _resolved_cache.pop(next(iter(_resolved_cache)))
        _resolved_cache[text] = resolved
    return resolved


_MISSING: Any = object()
WORKER_ENV_VAR = "REDRAY_RUNTIME_ENV"  # a worker's own resolved runtime env, as JSON
JOB_ENV_VAR = "REDRAY_JOB_RUNTIME_ENV"  # a submitted job's resolved runtime env, as JSON


def submitted_job_env() -> dict | None:
    """The runtime env of the submitted job this process is the driver of, if any."""
    raw = os.environ.get(JOB_ENV_VAR)
    return json.loads(raw) if raw else None


def inherited_env(job_env: dict | None) -> dict | None:
    """The runtime env new tasks and actors inherit (Ray: the parent's): a worker's own,
    else the job's."""
    if os.environ.get("REDRAY_WORKER"):
        raw = os.environ.get(WORKER_ENV_VAR)
        return json.loads(raw) if raw else None
    return job_env
