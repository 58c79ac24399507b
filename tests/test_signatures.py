"""Arguments are bound to the signature at `.remote()`, as in Ray: a call that Python would
refuse raises TypeError (with inspect's message) where it is written, for remote functions,
actor constructors and actor methods, also through a handle passed to a task."""

from __future__ import annotations

import inspect
import time

import pytest

import redray
from redray.signatures import Binder


@redray.remote
def three(x, y=0, z=0):
    return x + y + z


@redray.remote
def flexible(a, *rest, key=None, **extra):
    return [a, list(rest), key, extra]


@redray.remote
class Counter:
    def __init__(self, start, step=1):
        self.value = start
        self.step = step

    def add(self, times):
        self.value += times * self.step
        return self.value

    @staticmethod
    def double(x):
        return 2 * x

    @classmethod
    def name(cls, suffix):
        return cls.__name__ + suffix


@redray.remote
def call_through(handle):
    try:
        handle.add.remote(1, 2)
    except TypeError as exc:
        return f"TypeError: {exc}"
    return "accepted"


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        ((1, 2, 3, 4), {}, "too many positional arguments"),
        ((3,), {"x": 3}, "multiple values for argument 'x'"),
        ((), {}, "missing a required argument: 'x'"),
        ((1,), {"w": 2}, "got an unexpected keyword argument 'w'"),
    ],
)
def test_bad_task_arguments_raise_type_error_at_remote(ray_start, args, kwargs, message):
    with pytest.raises(TypeError, match=message):
        three.remote(*args, **kwargs)
    with pytest.raises(TypeError, match=message):
        three.options(num_cpus=0.5).remote(*args, **kwargs)


def test_good_task_arguments_still_run(ray_start):
    assert redray.get(three.remote(1, z=2)) == 3
    assert redray.get(three.remote(x=1, y=1)) == 2
    assert redray.get(flexible.remote(1, 2, 3, key="k", other=4)) == [1, [2, 3], "k", {"other": 4}]
    with pytest.raises(TypeError, match="missing a required argument: 'a'"):
        flexible.remote(key=1)


def test_bad_actor_constructor_arguments_raise_type_error(ray_start):
    with pytest.raises(TypeError, match="missing a required argument: 'start'"):
        Counter.remote()
    with pytest.raises(TypeError, match="too many positional arguments"):
        Counter.options(name="never-created").remote(1, 2, 3)
    with pytest.raises(ValueError):
        redray.get_actor("never-created")


def test_bad_actor_method_arguments_raise_type_error(ray_start):
    counter = Counter.remote(10, step=2)
    with pytest.raises(TypeError, match="missing a required argument: 'times'"):
        counter.add.remote()
    with pytest.raises(TypeError, match="too many positional arguments"):
        counter.add.remote(1, 2)
    with pytest.raises(TypeError, match="too many positional arguments"):
        counter.double.remote(1, 2)
    with pytest.raises(TypeError, match="missing a required argument: 'suffix'"):
        counter.name.remote()
    assert redray.get(counter.add.remote(times=1)) == 12
    assert redray.get([counter.double.remote(4), counter.name.remote("!")]) == [8, "Counter!"]
    # A handle passed to a task checks the calls made through it too.
    assert redray.get(call_through.remote(counter), timeout=30) == (
        "TypeError: too many positional arguments"
    )


def test_checking_costs_far_less_than_binding_a_signature():
    """The check runs on every `.remote()`: a plain call, not `inspect.Signature.bind`
    (compared with bind in the same process, so the machine's load cancels out)."""

    def fn(x, y=0, *, z=1):
        return None

    binder = Binder(fn)
    signature = inspect.signature(fn)

    def per_call(check) -> float:
        start = time.perf_counter()
        for _ in range(20_000):
            check()
        return time.perf_counter() - start

    checked = min(per_call(lambda: binder.check((1, 2), {"z": 3})) for _ in range(3))
    bound = min(per_call(lambda: signature.bind(1, 2, z=3)) for _ in range(3))
    assert checked < bound / 3, (checked, bound)
