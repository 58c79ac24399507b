"""`multiprocessing.Pool`'s API over actors spread across the cluster (Ray's module path)."""

from multiprocessing import JoinableQueue, TimeoutError

from redray.util.multiprocessing.pool import Pool
from redray.util.multiprocessing.results import AsyncResult

__all__ = ["AsyncResult", "JoinableQueue", "Pool", "TimeoutError"]
