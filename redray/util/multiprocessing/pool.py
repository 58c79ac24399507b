"""`Pool`: the standard library's `multiprocessing.Pool` over actors across the cluster.

A program written for `multiprocessing.Pool` runs on a cluster by changing its import:
each pool process is an actor (holding no CPU while it runs, as Ray's pool actors), placed
on the cluster's nodes in proportion to their CPUs. Calls travel in chunks; a call that
raises fails its `map`/`apply` with that same exception, its remote traceback attached.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from redray.api import cluster_resources, init, is_initialized, nodes
from redray.node.launch import read_current_cluster
from redray.util.multiprocessing.dispatch import DEPTH, Dispatcher
from redray.util.multiprocessing.results import (
    AsyncResult,
    IMapIterator,
    IMapUnorderedIterator,
)
from redray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

log = logging.getLogger(__name__)

_ADDRESS_VARIABLES = ("REDRAY_ADDRESS", "RAY_ADDRESS")


class Pool:
    """A pool of actor processes running calls in parallel (`multiprocessing.Pool`'s API).

    processes: how many actors (default: the cluster's CPUs; at most that many).
    initializer(*initargs) runs in each actor when it starts; maxtasksperchild replaces an
    actor after it ran that many chunks. ray_address: the cluster to connect to when this
    process is not connected yet (default as Ray: REDRAY_ADDRESS/RAY_ADDRESS, else the
    cluster `redray start` runs here, else a new private one). ray_remote_args: actor
    options for the pool's actors (a `scheduling_strategy` there replaces the spreading).
    """

    def __init__(
        self,
        processes: int | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: Iterable[Any] | None = None,
        maxtasksperchild: int | None = None,
        context: Any = None,
        ray_address: str | None = None,
        ray_remote_args: dict[str, Any] | None = None,
    ):
        if processes is not None and (not isinstance(processes, int) or processes <= 0):
            raise ValueError("Processes in the pool must be >0.")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if maxtasksperchild is not None and (
            not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0
        ):
            raise ValueError("maxtasksperchild must be a positive int or None")
        if context is not None:
            log.warning(
                "The 'context' argument is not supported by redray's Pool; pool processes "
                "are actors started by the cluster."
            )
        connect(processes, ray_address)
        cpus = int(cluster_resources().get("CPU", 0))
        if processes is None:
            processes = cpus
        if processes <= 0:
            raise ValueError("Processes in the pool must be >0.")
        if processes > cpus:
            raise ValueError(
                f"Tried to start a pool with {processes} processes on an existing cluster, "
                f"but there are only {cpus} CPUs in the cluster."
            )
        remote_args = dict(ray_remote_args or {})
        if "scheduling_strategy" in remote_args:
            strategies = [None] * processes
        else:
            strategies = _spread(processes)
        self._dispatcher = Dispatcher(
            remote_args,
            initializer,
            tuple(initargs) if initargs is not None else (),
            strategies,
            maxtasksperchild,
        )
        self._processes = processes

    # -- one call ---------------------------------------------------------------------------
    def apply(
        self,
        func: Callable[..., Any],
        args: Iterable[Any] = (),
        kwds: dict[str, Any] | None = None,
        *,
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        """func(*args, **kwds) in a pool actor; waits for and returns its result."""
        return self.apply_async(func, args, kwds, kwargs=kwargs).get()

    def apply_async(
        self,
        func: Callable[..., Any],
        args: Iterable[Any] = (),
        kwds: dict[str, Any] | None = None,
        callback: Callable[[Any], Any] | None = None,
        error_callback: Callable[[BaseException], Any] | None = None,
        *,
        kwargs: dict[str, Any] | None = None,
    ) -> AsyncResult:
        """func(*args, **kwds) in a pool actor; returns an AsyncResult at once."""
        call = (tuple(args or ()), dict(kwds or kwargs or {}))
        result = AsyncResult(func, iter([[call]]), 1, callback, error_callback, True)
        self._dispatcher.submit(result)
        return result

    # -- many calls -------------------------------------------------------------------------
    def map(
        self, func: Callable[[Any], Any], iterable: Iterable[Any], chunksize: int | None = None
    ) -> list:
        """[func(x) for x in iterable], computed by the pool's actors."""
        return self._map_async(func, iterable, chunksize, False).get()

    def map_async(
        self,
        func: Callable[[Any], Any],
        iterable: Iterable[Any],
        chunksize: int | None = None,
        callback: Callable[[list], Any] | None = None,
        error_callback: Callable[[BaseException], Any] | None = None,
    ) -> AsyncResult:
        """`map` returning an AsyncResult at once."""
        return self._map_async(func, iterable, chunksize, False, callback, error_callback)

    def starmap(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
    ) -> list:
        """[func(*args) for args in iterable], computed by the pool's actors."""
        return self._map_async(func, iterable, chunksize, True).get()

    def starmap_async(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        callback: Callable[[list], Any] | None = None,
        error_callback: Callable[[BaseException], Any] | None = None,
    ) -> AsyncResult:
        """`starmap` returning an AsyncResult at once."""
        return self._map_async(func, iterable, chunksize, True, callback, error_callback)

    def imap(
        self, func: Callable[[Any], Any], iterable: Iterable[Any], chunksize: int = 1
    ) -> IMapIterator:
        """func(x) for each x, as an iterator in the order of iterable (read as needed)."""
        self._check_running()
        _check_chunksize(chunksize)
        result = IMapIterator(func, _chunks(iter(iterable), chunksize, False), *self._window())
        self._dispatcher.submit(result)
        return result

    def imap_unordered(
        self, func: Callable[[Any], Any], iterable: Iterable[Any], chunksize: int = 1
    ) -> IMapIterator:
        """Like imap, the results in the order they finish."""
        self._check_running()
        _check_chunksize(chunksize)
        result = IMapUnorderedIterator(
            func, _chunks(iter(iterable), chunksize, False), *self._window()
        )
        self._dispatcher.submit(result)
        return result

    def _window(self) -> tuple[int, Any]:
        """How many chunks an imap may have taken and not consumed, and how to resume it."""
        return 2 * DEPTH * len(self._dispatcher), self._dispatcher.kick

    def _map_async(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Any],
        chunksize: int | None,
        star: bool,
        callback: Callable[[list], Any] | None = None,
        error_callback: Callable[[BaseException], Any] | None = None,
    ) -> AsyncResult:
        self._check_running()
        items = iterable if hasattr(iterable, "__len__") else list(iterable)
        if chunksize is None:
            chunksize, extra = divmod(len(items), len(self._dispatcher) * 4)
            chunksize += 1 if extra else 0
        else:
            _check_chunksize(chunksize)
        count = -(-len(items) // chunksize) if items else 0
        chunks = _chunks(iter(items), max(chunksize, 1), star)
        result = AsyncResult(func, chunks, count, callback, error_callback)
        self._dispatcher.submit(result)
        return result

    # -- life cycle -------------------------------------------------------------------------
    def close(self) -> None:
        """Accept no more work; the actors exit once the work given is done."""
        self._dispatcher.close()

    def terminate(self) -> None:
        """Kill the actors now; work not finished fails with ActorDiedError."""
        self._dispatcher.terminate()

    def join(self) -> None:
        """Wait for the actors to exit, after close() or terminate()."""
        if self._dispatcher.running:
            raise ValueError("Pool is still running")
        self._dispatcher.join()

    def _check_running(self) -> None:
        if not self._dispatcher.running:
            raise ValueError("Pool not running")

    def __enter__(self) -> Pool:
        self._check_running()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.terminate()

    def __del__(self) -> None:
        dispatcher = self.__dict__.get("_dispatcher")
        if dispatcher is not None and dispatcher.running:
            try:
                dispatcher.close()
            except Exception:
                pass

    def __reduce__(self) -> Any:
        raise NotImplementedError("pool objects cannot be passed between processes or pickled")

    def __repr__(self) -> str:
        state = "running" if self._dispatcher.running else "closed"
        return f"<redray.util.multiprocessing.Pool state={state} pool_size={self._processes}>"


def _check_chunksize(chunksize: Any) -> None:
    if not isinstance(chunksize, int) or chunksize < 1:
        raise ValueError(f"Chunksize must be 1+, not {chunksize!r}")


def _chunks(items: Iterator[Any], chunksize: int, star: bool) -> Iterator[list]:
    """The calls in lists of chunksize, each call as (args, kwargs)."""
    chunk: list = []
    for item in items:
        chunk.append((tuple(item) if star else (item,), None))
        if len(chunk) == chunksize:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def connect(processes: int | None, ray_address: str | None) -> None:
    """Connect as Ray's Pool does when this process is not connected yet."""
    if is_initialized():
        return
    if ray_address is not None:
        init(address=ray_address, num_cpus=processes if ray_address == "local" else None)
        return
    from_env = next((os.environ[v] for v in _ADDRESS_VARIABLES if os.environ.get(v)), None)
    if from_env is not None:
        init(num_cpus=processes if from_env == "local" else None)
    elif read_current_cluster() is not None:
        init(address="auto")
    else:
        init(num_cpus=processes)


def _spread(processes: int) -> list[Any]:
    """A scheduling strategy per actor: nodes get actors in proportion to their CPUs,
    interleaved so that consecutive actors sit on different nodes."""
    cpus = {
        n["NodeID"]: n["Resources"].get("CPU", 0)
        for n in nodes()
        if n["Alive"] and n["Resources"].get("CPU", 0) > 0
    }
    if len(cpus) <= 1:
        return [None] * processes
    total = sum(cpus.values())
    shares = {node: processes * count / total for node, count in cpus.items()}
    counts = {node: int(share) for node, share in shares.items()}
    by_remainder = sorted(shares, key=lambda node: shares[node] - counts[node], reverse=True)
    for node in by_remainder[: processes - sum(counts.values())]:
        counts[node] += 1
    order: list[Any] = []
    while len(order) < processes:
        for node in counts:
            if counts[node]:
                counts[node] -= 1
                order.append(NodeAffinitySchedulingStrategy(node, soft=True))
    return order
