"""Objects on a real cluster: put/get/wait, ref arguments, errors, the shared-memory store."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import block_until, mark

import redray
from redray.exceptions import GetTimeoutError, RayError, RayTaskError

KiB = 1 << 10
MiB = 1 << 20


class BadInput(Exception):
    """A user-defined exception raised inside tasks."""

    def __init__(self, message: str, code: int = 0):
        super().__init__(message)
        self.code = code


@redray.remote
def echo(x):
    return x


@redray.remote
def add(a, b):
    return a + b


@redray.remote
def blocker(started_file: str, release_file: str):
    mark(started_file)
    return block_until(release_file)


@redray.remote
def fails(message: str):
    raise BadInput(message, code=7)  # the line users must see in the traceback


@redray.remote
def describe(arg):
    return type(arg).__name__, arg if not isinstance(arg, redray.ObjectRef) else None


@redray.remote
def get_inside(container):
    refs = container["refs"] if isinstance(container, dict) else container
    assert all(isinstance(r, redray.ObjectRef) for r in refs)
    return redray.get(list(refs))


@redray.remote
def array_info(arr):
    return arr.shape, str(arr.dtype), float(arr.sum()), bool(arr.flags.writeable)


@redray.remote
def make_array(n: int):
    return np.arange(n, dtype=np.float64)


# -- put / get -----------------------------------------------------------------------------------
def test_put_get_single(ray_start):
    for value in (1, "text", b"bytes", None, 3.5, [1, [2, {"a": (3,)}]], {"k": {1, 2}}):
        assert redray.get(redray.put(value)) == value


def test_get_list_keeps_order(ray_start):
    refs = [redray.put(i) for i in range(10)]
    refs += [echo.remote(i) for i in range(10, 30)]
    refs.reverse()
    assert redray.get(refs) == list(reversed(range(30)))
    assert redray.get([]) == []


def test_get_same_ref_twice(ray_start):
    ref = echo.remote("same")
    assert redray.get([ref, ref]) == ["same", "same"]


def test_get_rejects_non_refs(ray_start):
    with pytest.raises(ValueError):
        redray.get(1)
    with pytest.raises(TypeError):
        redray.get([redray.put(1), 2])


def test_put_of_an_object_ref_is_a_type_error(ray_start):
    ref = redray.put(1)
    with pytest.raises(TypeError):
        redray.put(ref)
    # Wrapped in a container, a ref can be put (and comes back as a ref).
    inner = redray.get(redray.put([ref]))[0]
    assert isinstance(inner, redray.ObjectRef) and redray.get(inner) == 1


def test_get_timeout(ray_start, gate):
    ref = blocker.remote(gate.path("started"), gate.release_file)
    with pytest.raises(GetTimeoutError) as info:
        redray.get(ref, timeout=0.2)
    assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value, RayError)
    with pytest.raises(TimeoutError):
        redray.get([redray.put(1), ref], timeout=0)
    gate.open()
    assert redray.get(ref, timeout=30) is True


def test_get_negative_timeout_is_rejected(ray_start):
    with pytest.raises(ValueError):
        redray.get(redray.put(1), timeout=-1)


# -- wait ----------------------------------------------------------------------------------------
def test_wait_num_returns_and_timeout(ray_start, gate):
    slow = blocker.remote(gate.path("started"), gate.release_file)
    fast = [echo.remote(i) for i in range(3)]
    refs = [slow, *fast]

    ready, not_ready = redray.wait(refs, num_returns=3, timeout=30)
    assert ready == fast and not_ready == [slow]  # input order kept in both lists

    ready, not_ready = redray.wait(refs, num_returns=1)
    assert len(ready) == 1 and ready[0] in fast
    assert set(not_ready) == set(refs) - set(ready)

    ready, not_ready = redray.wait(refs, num_returns=4, timeout=0.3)
    assert ready == fast and not_ready == [slow]

    ready, not_ready = redray.wait([slow], timeout=0)
    assert (ready, not_ready) == ([], [slow])

    gate.open()
    ready, not_ready = redray.wait(refs, num_returns=4, fetch_local=False)
    assert ready == refs and not_ready == []


def test_wait_fetch_local_values_are_gettable(ray_start):
    refs = [make_array.remote(50_000) for _ in range(3)]
    ready, not_ready = redray.wait(refs, num_returns=3, fetch_local=True, timeout=30)
    assert ready == refs and not_ready == []
    assert [float(a.sum()) for a in redray.get(ready)] == [float(sum(range(50_000)))] * 3


def test_wait_validation_errors(ray_start):
    a, b = redray.put(1), redray.put(2)
    with pytest.raises(TypeError):
        redray.wait(a)
    with pytest.raises(TypeError):
        redray.wait((a, b))
    with pytest.raises(TypeError):
        redray.wait([a, "b"])
    with pytest.raises(ValueError):
        redray.wait([a, a])
    with pytest.raises(ValueError):
        redray.wait([a, b], num_returns=3)
    with pytest.raises(ValueError):
        redray.wait([a, b], num_returns=0)
    with pytest.raises(ValueError):
        redray.wait([a, b], timeout=-1)


def test_wait_loop_on_the_returned_list(ray_start, gate):
    """Waiting again on the list wait returned: every ref comes back once, in input order
    among those ready, and a slow one stays behind until it finishes."""
    slow = blocker.remote(gate.path("started"), gate.release_file)
    fast = [echo.remote(i) for i in range(200)]
    refs = [slow, *fast]
    seen = []
    not_ready = refs
    while len(not_ready) > 1:
        ready, not_ready = redray.wait(not_ready, num_returns=min(3, len(not_ready) - 1))
        assert ready == [r for r in refs if r in set(ready)]  # input order
        seen += ready
    assert sorted(redray.get(seen)) == list(range(200)) and not_ready == [slow]
    assert redray.wait(not_ready, timeout=0.2) == ([], [slow])
    gate.open()
    assert redray.wait(not_ready) == ([slow], [])


def test_wait_checks_a_returned_list_changed_in_place(ray_start):
    refs = [redray.put(i) for i in range(4)]
    ready, not_ready = redray.wait(refs)
    assert ready == refs[:1] and not_ready == refs[1:]
    not_ready.append(not_ready[0])
    with pytest.raises(ValueError):
        redray.wait(not_ready)
    not_ready[-1] = "not a ref"
    with pytest.raises(TypeError):
        redray.wait(not_ready)
    not_ready[-1] = refs[0]
    assert redray.wait(not_ready, num_returns=4) == ([*refs[1:], refs[0]], [])


def test_wait_on_empty_list(ray_start):
    assert redray.wait([]) == ([], [])


# -- ObjectRef arguments ---------------------------------------------------------------------
def test_top_level_refs_are_resolved(ray_start):
    ref = redray.put({"a": 1})
    assert redray.get(describe.remote(ref)) == ("dict", {"a": 1})
    assert redray.get(add.remote(echo.remote(2), b=redray.put(3))) == 5
    chain = redray.put(0)
    for _ in range(10):
        chain = add.remote(chain, 1)
    assert redray.get(chain) == 10


def test_pending_dependency_holds_no_worker(ray_start, gate):
    """A task waiting for its argument occupies no CPU: with 2 CPUs, one held by a blocked
    task and one dependent task waiting, independent work still runs."""
    slow = blocker.remote(gate.path("started"), gate.release_file)
    gate.wait_mark("started")
    dependents = [add.remote(slow, 1) for _ in range(4)]
    assert redray.get([echo.remote(i) for i in range(5)], timeout=20) == list(range(5))
    assert redray.wait(dependents, timeout=0) == ([], dependents)
    gate.open()
    assert redray.get(dependents, timeout=30) == [2, 2, 2, 2]


def test_nested_refs_pass_through(ray_start):
    refs = [redray.put(i) for i in range(3)] + [echo.remote("task")]
    assert redray.get(describe.remote([refs[0]]))[0] == "list"
    assert redray.get(get_inside.remote(refs)) == [0, 1, 2, "task"]
    assert redray.get(get_inside.remote({"refs": tuple(refs)})) == [0, 1, 2, "task"]


def test_refs_returned_from_tasks(ray_start):
    @redray.remote
    def make_refs():
        return [redray.put("inner"), echo.remote("nested task")]

    inner = redray.get(make_refs.remote())
    assert all(isinstance(r, redray.ObjectRef) for r in inner)
    assert redray.get(inner) == ["inner", "nested task"]


# -- errors --------------------------------------------------------------------------------------
def test_task_error_is_also_the_users_exception(ray_start):
    with pytest.raises(BadInput) as info:
        redray.get(fails.remote("bad thing"))
    err = info.value
    assert isinstance(err, RayTaskError)
    assert isinstance(err, RayError)
    assert err.code == 7  # the user's exception attributes are kept
    text = str(err)
    assert "bad thing" in text
    assert "fails" in text  # the remote function's name
    assert "raise BadInput(message, code=7)  # the line users must see" in text
    assert "test_objects.py" in text
    assert "BadInput" in text


def test_task_error_of_builtin_type(ray_start):
    @redray.remote
    def divide(a, b):
        return a / b

    with pytest.raises(ZeroDivisionError) as info:
        redray.get(divide.remote(1, 0))
    assert isinstance(info.value, RayTaskError)
    assert "return a / b" in str(info.value)


def test_errors_propagate_through_dependent_tasks(ray_start):
    failed = fails.remote("root cause")
    dependent = add.remote(failed, 1)
    deeper = add.remote(echo.remote(1), dependent)
    for ref in (failed, dependent, deeper):
        with pytest.raises(BadInput, match="root cause") as info:
            redray.get(ref)
        assert isinstance(info.value, RayTaskError)
        assert "fails" in str(info.value)


def test_error_from_nested_get_propagates(ray_start):
    @redray.remote
    def outer():
        return redray.get(fails.remote("from the inner task"))

    with pytest.raises(BadInput, match="from the inner task"):
        redray.get(outer.remote())


def test_error_in_list_get_is_raised(ray_start):
    refs = [echo.remote(1), fails.remote("one of many"), echo.remote(3)]
    with pytest.raises(BadInput, match="one of many"):
        redray.get(refs)
    assert redray.get(refs[2]) == 3


def test_unpicklable_put_is_a_type_error(ray_start):
    import threading

    with pytest.raises(TypeError, match="lock"):
        redray.put(threading.Lock())


# -- large objects (shared-memory store) -------------------------------------------------------
def test_large_arguments_and_returns(ray_start):
    big = np.random.default_rng(0).random(256 * KiB // 8 * 4)  # 1 MiB of float64
    assert big.nbytes > 100 * KiB
    shape, dtype, total, _ = redray.get(array_info.remote(big))
    assert shape == big.shape and dtype == "float64"
    assert total == pytest.approx(float(big.sum()))

    returned = redray.get(make_array.remote(300_000))  # 2.4 MB back
    np.testing.assert_array_equal(returned, np.arange(300_000, dtype=np.float64))
    # Large arrays come back as read-only views of the shared-memory store.
    assert returned.flags.writeable is False


def test_large_put_is_zero_copy_and_shared(ray_start):
    big = np.arange(1 * MiB, dtype=np.uint8)
    ref = redray.put(big)
    first, second = redray.get(ref), redray.get(ref)
    np.testing.assert_array_equal(first, big)
    assert first.flags.writeable is False
    # A task reads the same object without copying it over the wire.
    shape, dtype, total, writeable = redray.get(array_info.remote(ref))
    assert shape == big.shape and total == float(big.sum()) and writeable is False
    assert second.flags.writeable is False


def test_large_bytes_and_objects(ray_start):
    payload = os.urandom(512 * KiB)
    assert redray.get(echo.remote(payload)) == payload
    records = [{"i": i, "s": "x" * 100} for i in range(5000)]
    assert redray.get(echo.remote(records)) == records
    assert redray.get(redray.put(records)) == records
