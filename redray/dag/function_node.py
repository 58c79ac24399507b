"""`FunctionNode`: a remote function bound to its arguments (`f.bind(...)`)."""

from __future__ import annotations

from typing import Any

from redray.dag.dag_node import DAGNode


class FunctionNode(DAGNode):
    """A task in a graph: executing it submits the function with its bound arguments."""

    def __init__(
        self,
        func_body: Any,
        func_args: tuple | list,
        func_kwargs: dict[str, Any],
        func_options: dict[str, Any],
        other_args_to_resolve: dict[str, Any] | None = None,
        *,
        submitter: Any,
    ):
        self._body = func_body
        self._submitter = submitter  # the remote function (with its .options), has .remote
        super().__init__(func_args, func_kwargs, func_options, other_args_to_resolve)

    def _execute_impl(
        self, args: tuple, kwargs: dict, other: dict, inputs: tuple, input_kwargs: dict
    ) -> Any:
        return self._submitter.remote(*args, **kwargs)

    def __str__(self) -> str:
        return f"FunctionNode({getattr(self._body, '__qualname__', self._body)})"

    __repr__ = __str__
