"""`JobConfig`: a job's configuration given to `init(job_config=...)`, under Ray's name and
module path, with Ray's constructor.

redray honours `runtime_env` (env_vars), `ray_namespace`, `metadata` (kept with the job in
the GCS), `code_search_path` (directories added to the import path of the job's tasks and
actors) and `default_actor_lifetime="non_detached"`; `init` refuses, with a ValueError naming
it, any setting it cannot honour (Java options, detached-by-default actors, ...).
"""

from __future__ import annotations

from typing import Any

from redray.options import validate_runtime_env

_LIFETIMES = ("detached", "non_detached")


class JobConfig:
    """The configuration of a job (one driver and what it runs)."""

    def __init__(
        self,
        jvm_options: list[str] | None = None,
        code_search_path: list[str] | None = None,
        runtime_env: dict | None = None,
        _client_job: bool = False,
        metadata: dict | None = None,
        ray_namespace: str | None = None,
        default_actor_lifetime: str = "non_detached",
        _disable_job_level_lineage_reconstruction: bool = False,
        _py_driver_sys_path: list[str] | None = None,
    ):
        self.jvm_options = jvm_options or []
        search_path = code_search_path or []
        if not isinstance(search_path, (list, tuple)):
            raise TypeError(f"The type of code search path is incorrect: {type(code_search_path)}")
        self.code_search_path = search_path
        self._client_job = _client_job
        self.metadata = metadata or {}
        self.ray_namespace = ray_namespace
        self.set_runtime_env(runtime_env)
        self.set_default_actor_lifetime(default_actor_lifetime)
        self._disable_job_level_lineage_reconstruction = _disable_job_level_lineage_reconstruction
        self._py_driver_sys_path = _py_driver_sys_path or []
        self.py_logging_config: Any = None

    def set_metadata(self, key: str, value: str) -> None:
        """Add (or overwrite) one entry of the job's metadata."""
        self.metadata[key] = value

    def set_runtime_env(self, runtime_env: dict | None, validate: bool = False) -> None:
        """Replace the job's runtime environment (validate: check it now)."""
        self.runtime_env = runtime_env if runtime_env is not None else {}
        if validate:
            validate_runtime_env(self.runtime_env)

    def set_ray_namespace(self, ray_namespace: str) -> None:
        self.ray_namespace = ray_namespace

    def set_default_actor_lifetime(self, default_actor_lifetime: str) -> None:
        """ "detached" or "non_detached": the lifetime of actors that do not set one."""
        if default_actor_lifetime not in _LIFETIMES:
            raise ValueError("Default actor lifetime must be one of `detached`, `non_detached`")
        self.default_actor_lifetime = default_actor_lifetime

    def set_py_logging_config(self, logging_config: Any = None) -> None:
        self.py_logging_config = logging_config

    @classmethod
    def from_json(cls, job_config_json: dict[str, Any]) -> JobConfig:
        """A JobConfig from its JSON form (as job submission passes it)."""
        return cls(
            jvm_options=job_config_json.get("jvm_options"),
            code_search_path=job_config_json.get("code_search_path"),
            runtime_env=job_config_json.get("runtime_env"),
            metadata=job_config_json.get("metadata"),
            ray_namespace=job_config_json.get("ray_namespace"),
            default_actor_lifetime=job_config_json.get("default_actor_lifetime", "non_detached"),
            _disable_job_level_lineage_reconstruction=job_config_json.get(
                "disable_job_level_lineage_reconstruction", False
            ),
            _client_job=job_config_json.get("client_job", False),
            _py_driver_sys_path=job_config_json.get("py_driver_sys_path"),
        )

    def unsupported(self) -> list[str]:
        """The settings redray cannot honour (empty: all of them can be)."""
        refused = []
        if self.jvm_options:
            refused.append("jvm_options (redray runs Python workers only)")
        if self.default_actor_lifetime == "detached":
            refused.append(
                "default_actor_lifetime='detached' (pass lifetime='detached' to the actors "
                "that should outlive the job)"
            )
        if self._client_job:
            refused.append("_client_job (Ray Client is not supported)")
        if self._disable_job_level_lineage_reconstruction:
            refused.append("_disable_job_level_lineage_reconstruction")
        if self.py_logging_config is not None:
            refused.append("py_logging_config")
        return refused

    def import_paths(self) -> tuple[str, ...]:
        """Directories the job's tasks and actors import from, besides the driver's own."""
        return tuple(str(p) for p in (*self.code_search_path, *self._py_driver_sys_path))

    def __repr__(self) -> str:
        return (
            f"JobConfig(runtime_env={self.runtime_env!r}, metadata={self.metadata!r}, "
            f"ray_namespace={self.ray_namespace!r}, "
            f"default_actor_lifetime={self.default_actor_lifetime!r})"
        )
