"""The actor behind each process of a `Pool`: runs chunks of calls as a pool worker does."""

from __future__ import annotations

import os
import types
from multiprocessing.pool import ExceptionWithTraceback, MaybeEncodingError
from typing import Any

import cloudpickle

from redray.api import remote


@remote(num_cpus=0)
class PoolActor:
    """One pool process: runs the pool's initializer once, then chunks of calls in order."""

    def __init__(self, initializer: Any = None, initargs: Any = None):
        self._main = _ScriptNamespace()
        if initializer is not None:
            self._main.adopt(initializer)(*(initargs or ()))

    def ping(self) -> int:
        return os.getpid()

    def run_batch(self, func: Any, batch: list) -> tuple[bool, Any]:
        """(True, [results]) or, at the first call that raises, (False, its exception).

        The exception travels as the standard library's pool sends it: re-raised in the
        caller as itself, its remote traceback attached as `__cause__`.
        """
        results = []
        func = self._main.adopt(func)
        for args, kwargs in batch:
            try:
                results.append(func(*args, **kwargs) if kwargs else func(*args))
            except Exception as exc:
                return False, _sendable(exc)
        return True, results


def _sendable(exc: Exception) -> Any:
    wrapped = ExceptionWithTraceback(exc, exc.__traceback__)
    try:
        cloudpickle.dumps(wrapped)
    except Exception as reason:
        return MaybeEncodingError(reason, exc)
    return wrapped


class _ScriptNamespace:
    """One module namespace per actor for the functions of the driver's script.

    Functions of `__main__` arrive pickled by value, each with a private copy of the globals
    it uses, so a global that the initializer sets would be invisible to the mapped function.
    Rebinding them to one shared dict gives them what a forked pool process has: the
    script's module, whose globals persist between calls.
    """

    def __init__(self) -> None:
        self.globals: dict[str, Any] = {}

    def adopt(self, func: Any) -> Any:
        if not _from_script(func):
            return func
        shared = self.globals
        for name, value in func.__globals__.items():
            if name not in shared:
                shared[name] = value  # first: a recursive function finds itself here
                if _from_script(value):
                    shared[name] = self.adopt(value)
        adopted = types.FunctionType(
            func.__code__, shared, func.__name__, func.__defaults__, func.__closure__
        )
        adopted.__kwdefaults__ = func.__kwdefaults__
        adopted.__qualname__ = func.__qualname__
        adopted.__module__ = func.__module__
        adopted.__dict__.update(func.__dict__)
        return adopted


def _from_script(value: Any) -> bool:
    return isinstance(value, types.FunctionType) and value.__module__ == "__main__"
