"""`inspect_serializability`: find which part of a value stops it from being pickled.

A task's arguments, return values and the functions and classes it uses must pickle (by
cloudpickle). When one does not, this walks into it (a function's closure and the globals
it uses, an object's or class's attributes) down to the innermost members that fail, and
prints what it tried on the way, as Ray's helper of the same name does.
"""

from __future__ import annotations

import inspect
from typing import Any, TextIO

import cloudpickle


class FailureTuple:
    """A member that could not be pickled: the value, its name, and what holds it."""

    __slots__ = ("obj", "name", "parent")

    def __init__(self, obj: Any, name: str, parent: Any):
        self.obj = obj
        self.name = name
        self.parent = parent

    def __repr__(self) -> str:
        return f"FailTuple({self.name} [obj={self.obj}, parent={self.parent}])"


def inspect_serializability(
    base_obj: Any, name: str | None = None, depth: int = 3, print_file: TextIO | None = None
) -> tuple[bool, set[FailureTuple]]:
    """(whether base_obj pickles, the innermost members found that do not), looking at most
    `depth` levels deep; the walk is printed to print_file (stdout by default)."""
    name = name or str(base_obj)
    title = f"Checking Serializability of {name}"
    _print(print_file, "=" * len(title), title, "=" * len(title), sep="\n")
    failures: set[FailureTuple] = set()
    ok = _inspect(base_obj, name, depth, None, failures, print_file, 0)
    if not ok:
        _print(print_file, "Variables found to be non-serializable:")
        for failure in failures:
            _print(print_file, f"\t{failure}")
        _print(
            print_file,
            "Move their creation into the function or class that uses them, or pass them "
            "in a form that pickles.",
        )
    return ok, failures


def _pickles(value: Any) -> Exception | None:
    try:
        cloudpickle.dumps(value)
    except Exception as exc:
        return exc
    return None


def _inspect(
    obj: Any,
    name: str,
    depth: int,
    parent: Any,
    failures: set[FailureTuple],
    out: TextIO | None,
    level: int,
) -> bool:
    error = _pickles(obj)
    if error is None:
        return True
    indent = "    " * level
    _print(out, f"{indent}!!! FAIL serialization: {error}")
    found_inside = False
    if depth > 0:
        for member_name, member in _members(obj):
            _print(out, f"{indent}    Serializing '{member_name}' {member!r}...")
            if _pickles(member) is None:
                continue
            found_inside = True
            _inspect(member, member_name, depth - 1, obj, failures, out, level + 1)
    if not found_inside:  # nothing inside fails alone: this member is the culprit
        failures.add(FailureTuple(obj, name, parent))
    return False


def _members(obj: Any) -> list[tuple[str, Any]]:
    """What a value is made of, for the walk: a function's closure and globals it uses,
    otherwise its attributes."""
    if inspect.isfunction(obj):
        try:
            closure = inspect.getclosurevars(obj)
        except (TypeError, ValueError):
            return []
        return [*closure.nonlocals.items(), *closure.globals.items()]
    if inspect.isclass(obj):
        return [
            (key, value)
            for key, value in vars(obj).items()
            if not (key.startswith("__") and key.endswith("__"))
        ]
    members = list(getattr(obj, "__dict__", {}).items())
    for slot in getattr(type(obj), "__slots__", ()):
        if hasattr(obj, slot):
            members.append((slot, getattr(obj, slot)))
    return members


def _print(out: TextIO | None, *parts: Any, sep: str = " ") -> None:
    print(*parts, sep=sep, file=out)
