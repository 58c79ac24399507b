"""Checking call arguments against a remote function's or actor method's signature at the
call site, as Ray does: `f.remote(1, 2, 3)` for `def f(x)` raises TypeError where it is
written instead of failing later inside the cluster.

A signature is turned once into a *probe*: a function with the same parameter list and an
empty body, so each check is one plain Python call. Only when the probe refuses the
arguments is `inspect.Signature.bind` run, for Ray's (inspect's) error message. Signatures
travel with actor handles in a JSON-friendly form: a list of `[name, kind, has_default]`.
"""

from __future__ import annotations

import inspect
import keyword
import weakref
from collections.abc import Callable
from typing import Any

Probe = Callable[..., None]
Description = list  # [[name, kind (inspect.Parameter kind as an int), has_default], ...]

_MAX_PROBES = 4096  # probes of descriptions that arrived with actor handles
_probes: dict[int, tuple[Description, Probe | None, inspect.Signature | None]] = {}
_constructors: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_KEY = "signature"  # where a method's description lives in an actor's method table


def describe(fn: Any, drop_first: bool = False) -> Description | None:
    """The parameters of fn (without its first one, for methods called on an instance);
    None when fn has no signature Python can read (some builtins)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    params = list(signature.parameters.values())
    if drop_first:
        if not params or params[0].kind not in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            return None  # def m(*args): self arrives in args; accept anything
        params = params[1:]
    return [[p.name, int(p.kind), p.default is not inspect.Parameter.empty] for p in params]


def _signature(description: Description) -> inspect.Signature:
    return inspect.Signature(
        [
            inspect.Parameter(
                name,
                inspect._ParameterKind(kind),
                default=None if has_default else inspect.Parameter.empty,
            )
            for name, kind, has_default in description
        ]
    )


def _probe(description: Description) -> Probe | None:
    """A function that accepts exactly the arguments the description does."""
    parts: list[str] = []
    kinds = [kind for _, kind, _ in description]
    for index, (name, kind, has_default) in enumerate(description):
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            return None
        previous = kinds[index - 1] if index else None
        if kind == inspect.Parameter.KEYWORD_ONLY and previous not in (
            inspect.Parameter.KEYWORD_ONLY,
            inspect.Parameter.VAR_POSITIONAL,
        ):
            parts.append("*")
        if kind == inspect.Parameter.VAR_POSITIONAL:
            parts.append(f"*{name}")
        elif kind == inspect.Parameter.VAR_KEYWORD:
            parts.append(f"**{name}")
        else:
            parts.append(f"{name}=None" if has_default else name)
        following = kinds[index + 1] if index + 1 < len(kinds) else None
        if kind == inspect.Parameter.POSITIONAL_ONLY and following != kind:
            parts.append("/")
    namespace: dict[str, Any] = {}
    exec(f"def probe({', '.join(parts)}):\n    pass\n", namespace)  # noqa: S102
    return namespace["probe"]


class Binder:
    """The argument check of one remote function: `check(args, kwargs)`."""

    __slots__ = ("probe", "description")

    def __init__(self, fn: Any, drop_first: bool = False):
        self.description = describe(fn, drop_first)
        self.probe = _probe(self.description) if self.description is not None else None

    def check(self, args: tuple, kwargs: dict) -> None:
        """Raise TypeError (Ray's message) if fn cannot be called with these arguments."""
        probe = self.probe
        if probe is None:
            return
        try:
            probe(*args, **kwargs)
        except TypeError:
            refuse(self.description, args, kwargs)


def refuse(description: Description, args: tuple, kwargs: dict) -> None:
    """Raise the TypeError `inspect.Signature.bind` gives for these arguments."""
    try:
        _signature(description).bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(str(exc)) from None


def check_method(methods: dict[str, dict[str, Any]], name: str, args: tuple, kwargs: dict) -> None:
    """Check the arguments of a call of an actor's method (from its handle's method table)."""
    meta = methods.get(name)
    description = meta.get(_KEY) if meta is not None else None
    if description is None:
        return
    entry = _probes.get(id(description))
    if entry is None or entry[0] is not description:
        if len(_probes) >= _MAX_PROBES:
            _probes.clear()
        entry = _probes[id(description)] = (description, _probe(description), None)
    probe = entry[1]
    if probe is None:
        return
    try:
        probe(*args, **kwargs)
    except TypeError:
        refuse(description, args, kwargs)


def check_actor_creation(
    cls: type, methods: dict[str, dict[str, Any]], args: tuple, kwargs: dict
) -> None:
    """Check the constructor's arguments; the first time for cls, also record each method's
    parameters in the method table, so every handle can check calls of its methods."""
    binder = _constructors.get(cls)
    if binder is None:
        binder = _constructors[cls] = Binder(cls)
        for name, meta in methods.items():
            static = inspect.getattr_static(cls, name, None)
            bound_to_class = isinstance(static, (staticmethod, classmethod))
            meta[_KEY] = describe(getattr(cls, name, None), drop_first=not bound_to_class)
    binder.check(args, kwargs)
