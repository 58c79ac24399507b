"""Large arrays in a joblib call's arguments go to the object store once per Parallel call.

joblib hands the same arrays (a model's X and y, say) to every batch. Pickled with each
batch, they would be copied once per batch; instead each array of at least `MIN_BYTES` is
put in the object store the first time it is seen and travels as a ref: every actor reads
the stored copy, zero-copy and read-only, as joblib's own memory-mapped arrays are.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import cloudpickle
import numpy as np

from redray.api import get, put

MIN_BYTES = 1024 * 1024  # as joblib's max_nbytes="1M" for memory-mapping arguments


class SharedArrays:
    """The arrays stored during one Parallel call (kept alive, so ids stay theirs)."""

    def __init__(self, min_bytes: int = MIN_BYTES):
        self.min_bytes = min_bytes
        self._stored: dict[int, tuple[np.ndarray, Any]] = {}

    def wrap(self, func: Any) -> StoredArgumentsCall:
        return StoredArgumentsCall(func, self)

    def ref_for(self, array: np.ndarray) -> Any:
        entry = self._stored.get(id(array))
        if entry is None:
            entry = self._stored[id(array)] = (array, put(array))
        return entry[1]

    def clear(self) -> None:
        self._stored.clear()


class StoredArgumentsCall:
    """A callable pickled with its large arrays replaced by refs to stored copies."""

    def __init__(self, func: Any, shared: SharedArrays):
        self.func = func
        self._shared = shared

    def __call__(self) -> Any:
        return self.func()

    def __reduce__(self) -> Any:
        buffer = io.BytesIO()
        pickler = _Pickler(buffer, self._shared)
        pickler.dump(self.func)
        return _StoredCall, (buffer.getvalue(), pickler.refs)


class _StoredCall:
    """In the actor: fetch the stored arrays, rebuild the callable and call it."""

    def __init__(self, data: bytes, refs: list):
        self._data = data
        self._refs = refs

    def __call__(self) -> Any:
        arrays = get(self._refs) if self._refs else []
        return _Unpickler(io.BytesIO(self._data), arrays).load()()


class _Pickler(cloudpickle.CloudPickler):
    def __init__(self, file: io.BytesIO, shared: SharedArrays):
        super().__init__(file, protocol=5)
        self._shared = shared
        self.refs: list = []

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) is np.ndarray and obj.nbytes >= self._shared.min_bytes:
            self.refs.append(self._shared.ref_for(obj))
            return len(self.refs) - 1
        return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, arrays: list):
        super().__init__(file)
        self._arrays = arrays

    def persistent_load(self, index: int) -> Any:
        return self._arrays[index]
