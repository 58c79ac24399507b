"""`DAGNode`: a bound call (`f.bind(...)`, `A.bind(...)`, `a.m.bind(...)`) in a task graph.

A graph is built once and run with `execute(*args, **kwargs)`, which submits every node
below the one executed, each once per `execute` even when several nodes use it, children
first, and returns what the executed node's call returns (refs, an actor handle, a list of
refs for `MultiOutputNode`). Upstream results are passed on as refs, so the graph runs with
no round trip to the caller between its steps.
"""

from __future__ import annotations

import uuid
from typing import Any

from redray.dag import scan
from redray.dag.scan import DAGNodeBase


class DAGNode(DAGNodeBase):
    """A node of a task graph: its bound arguments, options and upstream nodes."""

    _is_input_node = False

    def __init__(
        self,
        args: tuple | list,
        kwargs: dict[str, Any],
        options: dict[str, Any],
        other_args_to_resolve: dict[str, Any] | None,
    ):
        self._bound_args: tuple | list = args or []
        self._bound_kwargs: dict[str, Any] = kwargs or {}
        self._bound_options: dict[str, Any] = options or {}
        self._bound_other_args_to_resolve: dict[str, Any] = other_args_to_resolve or {}
        self._stable_uuid = uuid.uuid4().hex
        # Which arguments hold nodes, so each execute only rebuilds those.
        upstream: dict[int, DAGNode] = {}
        self._args_with_nodes = _holding_nodes(enumerate(self._bound_args), upstream)
        self._kwargs_with_nodes = _holding_nodes(self._bound_kwargs.items(), upstream)
        self._other_with_nodes = _holding_nodes(self._bound_other_args_to_resolve.items(), upstream)
        self._upstream_nodes: list[DAGNode] = list(upstream.values())

    # -- what was bound ---------------------------------------------------------------------
    def get_args(self) -> tuple | list:
        """The bound positional arguments."""
        return self._bound_args

    def get_kwargs(self) -> dict[str, Any]:
        """The bound keyword arguments."""
        return self._bound_kwargs.copy()

    def get_options(self) -> dict[str, Any]:
        """The options given with `.options(...)` before `.bind(...)`."""
        return self._bound_options.copy()

    def get_other_args_to_resolve(self) -> dict[str, Any]:
        """Node-specific inputs resolved like arguments (the actor of a method call...)."""
        return self._bound_other_args_to_resolve.copy()

    def get_stable_uuid(self) -> str:
        """An id for this node, fixed at its creation."""
        return self._stable_uuid

    def _get_all_child_nodes(self) -> list[DAGNode]:
        """The nodes this one uses directly, nested in its arguments or not."""
        return list(self._upstream_nodes)

    # -- running ----------------------------------------------------------------------------
    def execute(self, *args: Any, **kwargs: Any) -> Any:
        """Run the graph below this node with these inputs (for the graph's `InputNode`)."""
        from_node: dict[int, Any] = {}
        input_node: DAGNode | None = None
        stack: list[tuple[DAGNode, bool]] = [(self, False)]
        # Post-order without recursion: a long chain of calls on one actor is a deep graph.
        while stack:
            node, children_done = stack.pop()
            if id(node) in from_node:
                continue
            if children_done:
                if node._is_input_node:
                    if input_node is not None and input_node is not node:
                        raise AssertionError("Each DAG should only have one unique InputNode.")
                    input_node = node
                from_node[id(node)] = node._run(from_node, args, kwargs)
                continue
            stack.append((node, True))
            for child in reversed(node._upstream_nodes):
                if id(child) not in from_node:
                    stack.append((child, False))
        return from_node[id(self)]

    def _run(self, from_node: dict[int, Any], inputs: tuple, input_kwargs: dict) -> Any:
        args = self._bound_args
        if self._args_with_nodes:
            args = list(args)
            for i in self._args_with_nodes:
                args[i] = scan.replace_nodes(args[i], from_node)
        kwargs = self._bound_kwargs
        if self._kwargs_with_nodes:
            kwargs = dict(kwargs)
            for k in self._kwargs_with_nodes:
                kwargs[k] = scan.replace_nodes(kwargs[k], from_node)
        other = self._bound_other_args_to_resolve
        if self._other_with_nodes:
            other = dict(other)
            for k in self._other_with_nodes:
                other[k] = scan.replace_nodes(other[k], from_node)
        return self._execute_impl(tuple(args), kwargs, other, inputs, input_kwargs)

    def _execute_impl(
        self, args: tuple, kwargs: dict, other: dict, inputs: tuple, input_kwargs: dict
    ) -> Any:
        """Submit this node's call, its upstream nodes' results already in args/kwargs."""
        raise NotImplementedError

    # -- misuse -----------------------------------------------------------------------------
    def __getattr__(self, attr: str) -> Any:
        if attr == "bind":
            raise AttributeError(f".bind() cannot be used again on {type(self)} ")
        if attr == "remote":
            raise AttributeError(
                f".remote() cannot be used on {type(self)}. To execute the task "
                "graph for this node, use .execute()."
            )
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{attr}'")

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __str__(self) -> str:
        return f"({type(self).__name__}, {self._stable_uuid})"

    __repr__ = __str__


def _holding_nodes(items: Any, upstream: dict[int, DAGNode]) -> list:
    """The keys of items whose values hold nodes; adds those nodes to upstream, in order."""
    keys = []
    for key, value in items:
        nodes = scan.find_nodes(value)
        if nodes:
            keys.append(key)
            for node in nodes:
                upstream.setdefault(id(node), node)
    return keys
