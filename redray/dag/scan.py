"""Finding the DAG nodes inside a node's arguments, and putting values in their place.

Arguments may hold nodes directly (`f.bind(a)`), inside containers (`f.bind([a, b])`) or
inside the user's own objects, as Ray allows. Containers are walked; other objects are
pickled once with each node (and each redray value, whose pickling has side effects such as
registering a borrowed reference) swapped for a placeholder, and rebuilt only when a node
was found in them. Values that cannot hold a node are never copied.
"""

from __future__ import annotations

import io
import pickle
import types
from typing import Any

import cloudpickle

_SCALARS = (
    int,
    float,
    complex,
    bool,
    str,
    bytes,
    bytearray,
    type(None),
    range,
    slice,
    type(Ellipsis),
)
_CODE = (
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.ModuleType,
    type,
)
_CONTAINERS = (list, tuple, dict, set, frozenset)


class DAGNodeBase:
    """What every node of a task graph is: the type the scan looks for."""


def _opaque(value: Any) -> bool:
    """True for values that never hold a node (or must not be pickled to find out)."""
    kind = type(value)
    if kind in _SCALARS or isinstance(value, _CODE):
        return True
    module = getattr(kind, "__module__", "") or ""
    return module.startswith(("redray.", "numpy")) and not isinstance(value, DAGNodeBase)


def find_nodes(value: Any) -> list[DAGNodeBase]:
    """The nodes in value, each once, in the order they appear."""
    found: dict[int, DAGNodeBase] = {}
    _find(value, found)
    return list(found.values())


def _find(value: Any, found: dict[int, DAGNodeBase]) -> None:
    if isinstance(value, DAGNodeBase):
        found.setdefault(id(value), value)
    elif _opaque(value):
        return
    elif type(value) in _CONTAINERS:
        items = value.items() if type(value) is dict else value
        for item in items:
            if type(value) is dict:
                _find(item[0], found)
                _find(item[1], found)
            else:
                _find(item, found)
    else:
        for node in _Pickled(value).nodes:
            found.setdefault(id(node), node)


def replace_nodes(value: Any, results: dict[int, Any]) -> Any:
    """value with each node `n` in it replaced by `results[id(n)]` (value itself if none)."""
    if isinstance(value, DAGNodeBase):
        return results[id(value)]
    if _opaque(value):
        return value
    kind = type(value)
    if kind is dict:
        return {replace_nodes(k, results): replace_nodes(v, results) for k, v in value.items()}
    if kind in _CONTAINERS:
        return kind(replace_nodes(item, results) for item in value)
    pickled = _Pickled(value)
    return pickled.rebuild(results) if pickled.nodes else value


class _Pickled:
    """An arbitrary object pickled with its nodes and redray values held aside."""

    def __init__(self, value: Any):
        self.nodes: list[DAGNodeBase] = []
        self.kept: list[Any] = []
        self.data = b""
        buffer = io.BytesIO()
        try:
            _Finder(buffer, self).dump(value)
        except Exception:
            # Unpicklable: it holds no node we could replace; submitting it will say why.
            self.nodes = []
            return
        self.data = buffer.getvalue()

    def rebuild(self, results: dict[int, Any]) -> Any:
        return _Rebuilder(io.BytesIO(self.data), self, results).load()


class _Finder(cloudpickle.CloudPickler):
    def __init__(self, file: io.BytesIO, into: _Pickled):
        super().__init__(file, protocol=5)
        self._into = into

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, DAGNodeBase):
            self._into.nodes.append(obj)
            return ("node", len(self._into.nodes) - 1)
        if type(obj) not in _SCALARS and _opaque(obj) and not isinstance(obj, _CODE):
            self._into.kept.append(obj)
            return ("kept", len(self._into.kept) - 1)
        return None


class _Rebuilder(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, source: _Pickled, results: dict[int, Any]):
        super().__init__(file)
        self._source = source
        self._results = results

    def persistent_load(self, pid: Any) -> Any:
        kind, index = pid
        if kind == "node":
            return self._results[id(self._source.nodes[index])]
        return self._source.kept[index]
