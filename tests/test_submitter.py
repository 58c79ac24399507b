"""The owner's task bookkeeping stays as small as the work in flight.

Every table of the task submitter (scheduling shapes, leases, tasks, children, lineage)
must give its entries back once their task, lease or object is gone, however many tasks of
however many shapes a long-running driver submitted.
"""

from __future__ import annotations

import numpy as np
from conftest import wait_for

import redray
from redray.core import context


@redray.remote
def square(x):
    return x * x


@redray.remote
def big(n):
    return np.ones(n, dtype=np.uint8)


@redray.remote
def spawn_children(n):
    return redray.get([square.remote(i) for i in range(n)])


def submitter_tables() -> dict[str, int]:
    submitter = context.current.submitter
    return {
        "shapes": len(submitter._shapes),
        "leases": len(submitter._leases),
        "tasks": len(submitter._tasks),
        "children": len(submitter._children),
        "lineage": len(submitter._lineage),
        "connecting": len(submitter._connecting),
    }


def test_tables_empty_once_tasks_of_many_shapes_are_done(ray_start):
    refs = []
    for i in range(200):
        cpus = (1, 0.5, 0.25, 0.125, 0.0625)[i % 5]
        refs.append(square.options(num_cpus=cpus).remote(i))
    assert redray.get(refs) == [i * i for i in range(200)]
    assert redray.get(spawn_children.remote(10)) == [i * i for i in range(10)]
    stored = big.remote(200 * 1024)  # kept in the store: its lineage is kept while it lives
    assert len(redray.get(stored)) == 200 * 1024
    assert submitter_tables()["lineage"] == 1
    del stored, refs
    empty = dict.fromkeys(submitter_tables(), 0)
    wait_for(lambda: submitter_tables() == empty, message="the submitter kept entries")
