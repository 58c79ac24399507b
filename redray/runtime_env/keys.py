"""Redis keys of runtime_env packages, on the cluster prefix of `redray.gcs`.

A package is one hash: field ``size`` (bytes), fields ``0``..``n-1`` its chunks, and field
``done`` written last, so a reader never sees a half-uploaded package as complete. Every call
goes through the Gcs client, whose sockets time out.
"""

from __future__ import annotations

import os
import time

from redray.gcs import Gcs

PACKAGE = "pkg:{digest}"
PACKAGE_INDEX = "pkgs"  # sorted set digest -> last time a driver uploaded or reused it
CHUNK_BYTES = 4 * 1024 * 1024
MAX_PACKAGES = 1000  # the least recently used beyond this are deleted
UPLOAD_TTL_SECONDS = 600  # an upload cut short leaves nothing behind for longer


def has_package(gcs: Gcs, digest: str) -> bool:
    """Whether a complete package is stored (and mark it used now)."""
    key = gcs.key(PACKAGE, digest=digest)
    pipe = gcs.redis.pipeline(transaction=False)
    pipe.hexists(key, "done")
    pipe.zadd(gcs.key(PACKAGE_INDEX), {digest: time.time()}, xx=True)
    return bool(pipe.execute()[0])


def put_package(gcs: Gcs, digest: str, data: bytes) -> None:
    """Store a package chunk by chunk (a few MiB per call) under a key of this upload's own,
    renamed into place once complete (so uploads of the same package never mix), then drop
    the least recently used beyond MAX_PACKAGES."""
    key = gcs.key(PACKAGE, digest=digest)
    staging = gcs.key(PACKAGE, digest=f"{digest}.upload.{os.urandom(8).hex()}")
    view = memoryview(data)
    count = 0
    try:
        for offset in range(0, len(data), CHUNK_BYTES):
            gcs.redis.hset(staging, str(count), bytes(view[offset : offset + CHUNK_BYTES]))
            gcs.redis.expire(staging, UPLOAD_TTL_SECONDS)
            count += 1
        pipe = gcs.redis.pipeline(transaction=True)
        pipe.hset(staging, mapping={"size": len(data), "chunks": count, "done": 1})
        pipe.persist(staging)
        pipe.renamenx(staging, key)
        pipe.zadd(gcs.key(PACKAGE_INDEX), {digest: time.time()})
        pipe.execute()
    finally:
        gcs.redis.delete(staging)  # (gone already when renamed)
    excess = gcs.redis.zcard(gcs.key(PACKAGE_INDEX)) - MAX_PACKAGES
    if excess > 0:
        old = gcs.redis.zrange(gcs.key(PACKAGE_INDEX), 0, excess - 1)
        pipe = gcs.redis.pipeline(transaction=True)
        for name in old:
            pipe.delete(gcs.key(PACKAGE, digest=name.decode()))
        pipe.zrem(gcs.key(PACKAGE_INDEX), *old)
        pipe.execute()


def get_package(gcs: Gcs, digest: str) -> bytes | None:
    """A stored package's bytes, or None if it is not (completely) stored."""
    key = gcs.key(PACKAGE, digest=digest)
    meta = gcs.redis.hmget(key, "chunks", "done")
    if meta[1] is None:
        return None
    parts = []
    for index in range(int(meta[0])):
        part = gcs.redis.hget(key, str(index))
        if part is None:
            return None
        parts.append(part)
    return b"".join(parts)
