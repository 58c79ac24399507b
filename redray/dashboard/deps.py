"""Whether the dashboard's optional packages are installed, asked without importing them."""

from __future__ import annotations

import importlib.util

PACKAGES = ("aiohttp", "prometheus_client")


class DashboardDependencyError(ImportError):
    """The `dashboard` extra is not installed."""


def missing() -> list[str]:
    return [name for name in PACKAGES if importlib.util.find_spec(name) is None]


def check() -> None:
    """DashboardDependencyError naming what to install when a package is missing."""
    absent = missing()
    if absent:
        raise DashboardDependencyError(
            f"The dashboard needs {', '.join(absent)}, which {'is' if len(absent) == 1 else 'are'}"
            " not installed: pip install 'redray[dashboard]' (or leave the dashboard out: it "
            "is off unless --include-dashboard / include_dashboard=True is given)."
        )
