"""Per-node shared-memory object store: arena, allocator, object table and value layout.

Submodules are imported on first use: the raylet needs the store but not the value layout
(which imports numpy), and every megabyte a node process imports counts.
"""

from typing import Any

_EXPORTS = {
    "Allocator": "redray.objstore.allocator",
    "SharedArena": "redray.objstore.arena",
    "Serialized": "redray.objstore.layout",
    "deserialize": "redray.objstore.layout",
    "serialize": "redray.objstore.layout",
    "ObjectStore": "redray.objstore.store",
    "ObjectStoreFullError": "redray.objstore.store",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'redray.objstore' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = sorted(_EXPORTS)
