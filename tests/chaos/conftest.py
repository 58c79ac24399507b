"""The chaos suite: faults injected into real clusters (SIGKILL, SIGSTOP, Redis restarts).

Every test builds its own cluster with the `redray` command (see harness.py) in its own
temp dir, and kills everything it started when it ends, whatever happened.
Run it alone with `pytest -m chaos tests/chaos`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from chaos.harness import Cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """An empty cluster: the test starts its heads and nodes; all is killed at the end."""
    made = Cluster(tmp_path / "cluster")
    try:
        yield made
    finally:
        made.shutdown()
