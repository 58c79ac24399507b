"""`InputNode`: the inputs given to `execute`, and `InputAttributeNode` for parts of them.

`with InputNode() as inp:` marks where `dag.execute(...)`'s arguments enter the graph. With
one positional argument, `inp` is that value; otherwise it is a `DAGInputData` of all of
them. `inp[0]`, `inp["key"]` and `inp.name` pick one part (a positional argument, a keyword
argument or an item/attribute of the single input).
"""

from __future__ import annotations

from typing import Any

from redray.dag.dag_node import DAGNode

_FIRST_LEVEL_KEYS = (
    "Please only use int index or str as first-level key to access fields of dag input."
)


class InputNode(DAGNode):
    """The graph's input: a single instance per graph, used inside a `with` block."""

    _is_input_node = True

    def __init__(
        self,
        *args: Any,
        input_type: Any = None,
        _other_args_to_resolve: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        if args or kwargs:
            raise ValueError("InputNode should not take any args or kwargs.")
        self.input_attribute_nodes: dict[Any, InputAttributeNode] = {}
        self.input_type = input_type
        self._in_context_manager = False
        super().__init__([], {}, {}, _other_args_to_resolve)

    def __enter__(self) -> InputNode:
        self._in_context_manager = True
        return self

    def __exit__(self, *exc_info: Any) -> None:
        pass

    def _execute_impl(
        self, args: tuple, kwargs: dict, other: dict, inputs: tuple, input_kwargs: dict
    ) -> Any:
        if not self._in_context_manager:
            raise AssertionError(
                "InputNode is a singleton instance that should be only used in context "
                "manager for dag building and execution. See the docstring of class "
                "InputNode for examples."
            )
        if len(inputs) == 1 and not input_kwargs:
            return inputs[0]
        return DAGInputData(*inputs, **input_kwargs)

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__") or "input_attribute_nodes" not in self.__dict__:
            return super().__getattr__(key)
        return self._attribute(key, "__getattr__")

    def __getitem__(self, key: int | str) -> InputAttributeNode:
        if not isinstance(key, (str, int)):
            raise AssertionError(
                "Please only use int index or str as first-level key to access fields of dag input."
            )
        return self._attribute(key, "__getitem__")

    def _attribute(self, key: int | str, accessor: str) -> InputAttributeNode:
        cache_key = (key, accessor) if accessor == "__getattr__" else key
        node = self.input_attribute_nodes.get(cache_key)
        if node is None:
            node = self.input_attribute_nodes[cache_key] = InputAttributeNode(self, key, accessor)
        return node

    def __str__(self) -> str:
        return "InputNode()"

    __repr__ = __str__


class InputAttributeNode(DAGNode):
    """One part of the graph's input: `inp[0]`, `inp["key"]` or `inp.name`."""

    def __init__(
        self,
        dag_input_node: InputNode,
        key: int | str,
        accessor_method: str,
        input_type: str | None = None,
    ):
        self._dag_input_node = dag_input_node
        self._key = key
        self._accessor_method = accessor_method
        super().__init__(
            [],
            {},
            {},
            {
                "dag_input_node": dag_input_node,
                "key": key,
                "accessor_method": accessor_method,
                "result_type_string": input_type,
            },
        )

    @property
    def key(self) -> int | str:
        return self._key

    def _execute_impl(
        self, args: tuple, kwargs: dict, other: dict, inputs: tuple, input_kwargs: dict
    ) -> Any:
        value = other["dag_input_node"]
        if isinstance(value, DAGInputData):
            return value[self._key]
        if isinstance(self._key, str) and self._accessor_method == "__getattr__":
            return getattr(value, self._key)
        if isinstance(self._key, (str, int)):
            return value[self._key]
        raise ValueError(_FIRST_LEVEL_KEYS)

    def __str__(self) -> str:
        return f'InputAttributeNode["{self._key}"]'

    __repr__ = __str__


class DAGInputData:
    """All of `execute`'s arguments when there is not exactly one positional argument."""

    def __init__(self, *args: Any, **kwargs: Any):
        self._args = list(args)
        self._kwargs = kwargs

    def __getitem__(self, key: int | str) -> Any:
        if isinstance(key, int):
            return self._args[key]
        if isinstance(key, str):
            return self._kwargs[key]
        raise ValueError(_FIRST_LEVEL_KEYS)
