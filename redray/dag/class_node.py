"""`ClassNode` (an actor created in a graph) and `ClassMethodNode` (a call on an actor).

`A.bind(...)` is an actor that each `execute` creates anew (as Ray does); its method calls
(`node.method.bind(...)`) run on that actor in the order they were bound. A method bound on
a live actor's handle (`handle.method.bind(...)`) calls that actor at every `execute`.
"""

from __future__ import annotations

from typing import Any

from redray.dag.dag_node import DAGNode
from redray.dag.input_node import InputNode

PARENT_CLASS_NODE_KEY = "parent_class_node"
PREV_CLASS_METHOD_CALL_KEY = "prev_class_method_call"


class ClassNode(DAGNode):
    """An actor creation in a graph; `node.method.bind(...)` binds calls on it."""

    def __init__(
        self,
        cls: type,
        cls_args: tuple | list,
        cls_kwargs: dict[str, Any],
        cls_options: dict[str, Any],
        other_args_to_resolve: dict[str, Any] | None = None,
        *,
        creator: Any,
    ):
        self._body = cls
        self._creator = creator  # the actor class (with its .options), has .remote
        self._last_call: ClassMethodNode | None = None
        super().__init__(cls_args, cls_kwargs, cls_options, other_args_to_resolve)
        if any(isinstance(node, InputNode) for node in _all_below(self)):
            raise ValueError(
                "InputNode handles user dynamic input the DAG, and cannot be used as args, "
                "kwargs, or other_args_to_resolve in ClassNode constructor because it is not "
                "available at class construction or binding time."
            )

    def _execute_impl(
        self, args: tuple, kwargs: dict, other: dict, inputs: tuple, input_kwargs: dict
    ) -> Any:
        return self._creator.remote(*args, **kwargs)

    def __getattr__(self, method_name: str) -> Any:
        body = self.__dict__.get("_body")
        if body is None or method_name.startswith("__"):
            return super().__getattr__(method_name)
        if method_name == "bind" and not hasattr(body, "bind"):
            raise AttributeError(f".bind() cannot be used again on {type(self)} ")
        getattr(body, method_name)  # AttributeError for a method the class does not have
        return _UnboundClassMethodNode(self, method_name, {})

    def __str__(self) -> str:
        return f"ClassNode({getattr(self._body, '__qualname__', self._body)})"

    __repr__ = __str__


class _UnboundClassMethodNode:
    """`class_node.method`: `.bind(...)` (or `.options(...).bind(...)`) makes the call node."""

    def __init__(self, actor: ClassNode, method_name: str, options: dict[str, Any]):
        self._actor = actor
        self._method_name = method_name
        self._options = options

    def bind(self, *args: Any, **kwargs: Any) -> ClassMethodNode:
        node = ClassMethodNode(
            self._method_name,
            args,
            kwargs,
            self._options,
            {
                PARENT_CLASS_NODE_KEY: self._actor,
                PREV_CLASS_METHOD_CALL_KEY: self._actor._last_call,
            },
        )
        self._actor._last_call = node
        return node

    def options(self, **options: Any) -> _UnboundClassMethodNode:
        self._options = options
        return self

    def __getattr__(self, attr: str) -> Any:
        if attr == "remote":
            raise AttributeError(
                ".remote() cannot be used on ClassMethodNodes. Use .bind() instead to express "
                "an symbolic actor call."
            )
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{attr}'")


class ClassMethodNode(DAGNode):
    """A method call on an actor: one bound in the graph (ClassNode) or a live handle."""

    def __init__(
        self,
        method_name: str,
        method_args: tuple | list,
        method_kwargs: dict[str, Any],
        method_options: dict[str, Any],
        other_args_to_resolve: dict[str, Any],
    ):
        self._method_name = method_name
        self._parent_class_node = other_args_to_resolve.get(PARENT_CLASS_NODE_KEY)
        self._prev_class_method_call = other_args_to_resolve.get(PREV_CLASS_METHOD_CALL_KEY)
        super().__init__(method_args, method_kwargs, method_options, other_args_to_resolve)

    def get_method_name(self) -> str:
        return self._method_name

    def _execute_impl(
        self, args: tuple, kwargs: dict, other: dict, inputs: tuple, input_kwargs: dict
    ) -> Any:
        method = getattr(other[PARENT_CLASS_NODE_KEY], self._method_name)
        if self._bound_options:
            method = method.options(**self._bound_options)
        return method.remote(*args, **kwargs)

    def __str__(self) -> str:
        return f"ClassMethodNode({self._method_name}())"

    __repr__ = __str__


def _all_below(node: DAGNode) -> list[DAGNode]:
    """Every node node depends on, directly or not."""
    seen: dict[int, DAGNode] = {}
    pending = list(node._upstream_nodes)
    while pending:
        child = pending.pop()
        if id(child) not in seen:
            seen[id(child)] = child
            pending.extend(child._upstream_nodes)
    return list(seen.values())
