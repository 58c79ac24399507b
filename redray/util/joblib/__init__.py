"""joblib on the cluster: `register_ray()`, then `with joblib.parallel_backend("ray"): ...`."""

from __future__ import annotations

try:
    from joblib.parallel import register_parallel_backend
except ImportError as exc:  # joblib is an optional dependency
    raise ImportError(
        "redray.util.joblib needs joblib: pip install 'redray[joblib]' (or joblib)."
    ) from exc

from redray.util.joblib.ray_backend import RayBackend


def register_ray() -> None:
    """Register the "ray" joblib backend (scikit-learn's n_jobs then runs on the cluster)."""
    register_parallel_backend("ray", RayBackend)


__all__ = ["RayBackend", "register_ray"]
