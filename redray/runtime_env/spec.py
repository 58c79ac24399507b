"""runtime_env dicts: checking them, merging a child's over its parent's, naming them.

A *resolved* runtime_env is what travels to nodes: local paths replaced by package URIs
(``gcs://_redray_pkg_<sha256>.zip``), a requirements file replaced by its lines, ``excludes``
dropped (already applied). Only resolved environments reach a raylet.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

FIELDS = ("env_vars", "working_dir", "py_modules", "pip", "excludes", "config")
CONFIG_FIELDS = ("setup_timeout_seconds", "eager_install")
DEFAULT_SETUP_TIMEOUT_SECONDS = 600  # as Ray
URI_PREFIX = "gcs://_redray_pkg_"
URI_SUFFIX = ".zip"
SETUP_FIELDS = ("working_dir", "py_modules", "pip")  # what needs work on a node


def validate(runtime_env: Any) -> None:
    """TypeError/ValueError for a runtime_env Ray would refuse (or redray cannot honour)."""
    if runtime_env is None:
        return
    if not isinstance(runtime_env, dict):
        raise TypeError("runtime_env must be a dict.")
    unsupported = set(runtime_env) - set(FIELDS)
    if unsupported:
        raise ValueError(
            f"runtime_env fields {sorted(unsupported)} are not supported by redray; "
            f"supported: {sorted(FIELDS)}."
        )
    env_vars = runtime_env.get("env_vars")
    if env_vars is not None and (
        not isinstance(env_vars, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items())
    ):
        raise TypeError("runtime_env['env_vars'] must be a dict of str to str.")
    working_dir = runtime_env.get("working_dir")
    if working_dir is not None and not isinstance(working_dir, str):
        raise TypeError("runtime_env['working_dir'] must be a str (a directory, a .zip or a URI).")
    py_modules = runtime_env.get("py_modules")
    if py_modules is not None and (
        not isinstance(py_modules, list) or not all(isinstance(m, str) for m in py_modules)
    ):
        raise TypeError("runtime_env['py_modules'] must be a list of str (directories or wheels).")
    excludes = runtime_env.get("excludes")
    if excludes is not None and (
        not isinstance(excludes, list) or not all(isinstance(e, str) for e in excludes)
    ):
        raise TypeError("runtime_env['excludes'] must be a list of str (gitwildmatch patterns).")
    _validate_pip(runtime_env.get("pip"))
    _validate_config(runtime_env.get("config"))


def _validate_pip(pip: Any) -> None:
    if pip is None or isinstance(pip, str):
        return
    if isinstance(pip, list):
        if not all(isinstance(p, str) for p in pip):
            raise TypeError("runtime_env['pip'] must be a list of str.")
        return
    if isinstance(pip, dict):
        unknown = set(pip) - {"packages", "pip_check", "pip_version", "pip_install_options"}
        if unknown:
            raise ValueError(f"runtime_env['pip'] has unknown fields {sorted(unknown)}.")
        packages = pip.get("packages")
        if not (isinstance(packages, list) and all(isinstance(p, str) for p in packages)) and (
            not isinstance(packages, str)
        ):
            raise TypeError("runtime_env['pip']['packages'] must be a list of str or a file.")
        return
    raise TypeError("runtime_env['pip'] must be a list, a requirements file path or a dict.")


def _validate_config(config: Any) -> None:
    if config is None:
        return
    if not isinstance(config, dict):
        raise TypeError("runtime_env['config'] must be a dict.")
    unknown = set(config) - set(CONFIG_FIELDS)
    if unknown:
        raise ValueError(f"runtime_env['config'] has unknown fields {sorted(unknown)}.")
    timeout = config.get("setup_timeout_seconds")
    if timeout is not None and (
        not isinstance(timeout, int)
        or isinstance(timeout, bool)
        or (timeout <= 0 and timeout != -1)
    ):
        raise ValueError("setup_timeout_seconds must be a positive int, or -1 for no timeout.")


def merge(parent: dict | None, child: dict | None) -> dict | None:
    """Ray's rule: the child's fields replace the parent's, except env_vars, merged (the
    child's value wins for a variable both set)."""
    if not child:
        return parent or None
    if not parent:
        return child
    merged = {**parent, **child}
    if "env_vars" in parent and "env_vars" in child:
        merged["env_vars"] = {**parent["env_vars"], **child["env_vars"]}
    return merged


def needs_setup(runtime_env: dict | None) -> bool:
    return bool(runtime_env) and any(runtime_env.get(name) for name in SETUP_FIELDS)


def setup_part(runtime_env: dict) -> dict:
    """What a node must prepare for a resolved runtime_env (env_vars aside)."""
    return {name: runtime_env[name] for name in SETUP_FIELDS if runtime_env.get(name)}


def digest(value: Any) -> str:
    """A stable name for a JSON-able value (a resolved env's setup part, a package)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def setup_timeout(runtime_env: dict) -> float | None:
    """Seconds a node may spend preparing the env (None: no limit)."""
    timeout = (runtime_env.get("config") or {}).get("setup_timeout_seconds")
    if timeout is None:
        return float(DEFAULT_SETUP_TIMEOUT_SECONDS)
    return None if timeout == -1 else float(timeout)


def package_uri(content_digest: str) -> str:
    return f"{URI_PREFIX}{content_digest}{URI_SUFFIX}"


def uri_digest(uri: str) -> str | None:
    """The content digest of a package URI made by redray, else None."""
    if uri.startswith(URI_PREFIX) and uri.endswith(URI_SUFFIX):
        return uri[len(URI_PREFIX) : -len(URI_SUFFIX)]
    return None
