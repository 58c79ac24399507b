"""redray: a lightweight, Redis-backed task and actor runtime with Ray core's API.

import redray as ray

@ray.remote
def square(x):
    return x * x

print(ray.get([square.remote(i) for i in range(10)]))
"""

from redray import exceptions
from redray.api import (
    available_resources,
    cancel,
    cluster_resources,
    get,
    get_actor,
    get_gpu_ids,
    init,
    is_initialized,
    kill,
    method,
    nodes,
    put,
    remote,
    shutdown,
    timeline,
    wait,
)
from redray.core.generators import DynamicObjectRefGenerator, ObjectRefGenerator
from redray.core.object_ref import ObjectID, ObjectRef
from redray.runtime_context import get_runtime_context

__version__ = "0.1.0"


def __getattr__(name: str):
    # `redray.util`, `redray.actor`, `redray.job_config` and `redray.dag` as attributes (as
    # `ray.util`), imported on first use.
    if name in ("util", "actor", "job_config", "dag"):
        import importlib

        return importlib.import_module(f"redray.{name}")
    raise AttributeError(f"module 'redray' has no attribute {name!r}")


__all__ = [
    "DynamicObjectRefGenerator",
    "ObjectID",
    "ObjectRef",
    "ObjectRefGenerator",
    "available_resources",
    "cancel",
    "cluster_resources",
    "exceptions",
    "get",
    "get_actor",
    "get_gpu_ids",
    "get_runtime_context",
    "init",
    "is_initialized",
    "kill",
    "method",
    "nodes",
    "put",
    "remote",
    "shutdown",
    "timeline",
    "wait",
]
