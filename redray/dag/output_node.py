"""`MultiOutputNode`: several nodes executed as one graph, returning a list of results."""

from __future__ import annotations

from typing import Any

from redray.dag.dag_node import DAGNode


class MultiOutputNode(DAGNode):
    """The end of a graph with several outputs: `execute` returns their results as a list."""

    def __init__(self, args: list | tuple, other_args_to_resolve: dict[str, Any] | None = None):
        if isinstance(args, tuple):
            args = list(args)
        if not isinstance(args, list):
            raise ValueError(f"Invalid input type for `args`, {type(args)}.")
        super().__init__(args, {}, {}, other_args_to_resolve or {})

    def _execute_impl(
        self, args: tuple, kwargs: dict, other: dict, inputs: tuple, input_kwargs: dict
    ) -> list:
        return list(args)
