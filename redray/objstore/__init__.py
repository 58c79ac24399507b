"""Per-node shared-memory object store: arena, allocator, object table and value layout."""

from redray.objstore.allocator import Allocator
from redray.objstore.arena import SharedArena
from redray.objstore.layout import Serialized, deserialize, serialize
from redray.objstore.store import ObjectStore, ObjectStoreFullError

__all__ = [
    "Allocator",
    "ObjectStore",
    "ObjectStoreFullError",
    "Serialized",
    "SharedArena",
    "deserialize",
    "serialize",
]
