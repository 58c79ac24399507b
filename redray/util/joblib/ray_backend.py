"""The `"ray"` joblib backend: joblib's batches run on a redray `Pool` across the cluster."""

from __future__ import annotations

from typing import Any

from joblib._parallel_backends import (
    AutoBatchingMixin,
    FallbackToBackend,
    ParallelBackendBase,
    PoolManagerMixin,
    SequentialBackend,
)

from redray.api import cluster_resources
from redray.util.joblib.shared_arrays import SharedArrays
from redray.util.multiprocessing.pool import Pool, connect


class RayBackend(PoolManagerMixin, AutoBatchingMixin, ParallelBackendBase):
    """Runs each Parallel call's batches on a pool of actors (one per job).

    n_jobs=-1 is every CPU of the cluster (-2 all but one, ...); a larger n_jobs is capped
    at the cluster's CPUs. Large arrays in the arguments are stored once per call (see
    shared_arrays). ray_remote_args configures the pool's actors.
    """

    supports_retrieve_callback = True
    supports_return_generator = True
    supports_timeout = True
    supports_inner_max_num_threads = True
    uses_threads = False
    supports_sharedmem = False

    def __init__(
        self,
        nesting_level: int | None = None,
        inner_max_num_threads: int | None = None,
        ray_remote_args: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        self.ray_remote_args = ray_remote_args
        self._shared = SharedArrays()
        super().__init__(
            nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads, **kwargs
        )

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            return 1
        connect(None, None)
        cpus = max(int(cluster_resources().get("CPU", 0)), 1)
        if n_jobs < 0:
            n_jobs = max(cpus + 1 + n_jobs, 1)
        return min(n_jobs, cpus)

    def configure(
        self,
        n_jobs: int = 1,
        parallel: Any = None,
        prefer: str | None = None,
        require: str | None = None,
        ray_remote_args: dict[str, Any] | None = None,
        **backend_kwargs: Any,
    ) -> int:
        n_jobs = self.effective_n_jobs(n_jobs)
        if n_jobs == 1:
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        remote_args = dict(ray_remote_args or self.ray_remote_args or {})
        # As joblib's process backends: inner thread pools (BLAS, OpenMP) sized to share the
        # CPUs between the jobs instead of each taking them all.
        if "runtime_env" not in remote_args:
            remote_args["runtime_env"] = {"env_vars": self._prepare_worker_env(n_jobs)}
        self.parallel = parallel
        self._pool = Pool(n_jobs, ray_remote_args=remote_args)
        return n_jobs

    def submit(self, func: Any, callback: Any = None) -> Any:
        return super().submit(self._shared.wrap(func), callback)

    def terminate(self) -> None:
        super().terminate()
        self._shared.clear()
