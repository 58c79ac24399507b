"""Validation of actor and actor-method options with Ray's rules and error types (TypeError
for a wrong type, ValueError for a wrong value), where they are written, before any
cluster. Task options: tests/test_tasks.py."""

from __future__ import annotations

import pytest

import redray


class Plain:
    def method(self):
        return 1


@pytest.mark.parametrize(
    "options, error",
    [
        ({"max_concurrency": -1}, ValueError),
        ({"max_concurrency": 1.5}, TypeError),
        ({"max_restarts": -2}, ValueError),
        ({"max_restarts": 0.5}, TypeError),
        ({"max_task_retries": -2}, ValueError),
        ({"max_pending_calls": -2}, ValueError),
        ({"max_pending_calls": 1.5}, TypeError),
        ({"lifetime": "forever"}, ValueError),
        ({"lifetime": 3}, TypeError),
        ({"namespace": 3}, TypeError),
        ({"namespace": ""}, ValueError),
        ({"name": 3}, TypeError),
        ({"name": ""}, ValueError),
        ({"get_if_exists": True}, ValueError),
        ({"get_if_exists": 1}, TypeError),
        ({"concurrency_groups": 3}, TypeError),
        ({"object_store_memory": -1}, ValueError),
        ({"object_store_memory": 1.5}, TypeError),
        ({"num_cpus": 1e-7}, ValueError),
        ({"num_gpus": "1"}, TypeError),
        ({"allow_out_of_order_execution": 1}, TypeError),
        ({"max_calls": 1}, ValueError),
        ({"max_retries": 1}, ValueError),
    ],
)
def test_bad_actor_options_fail_where_written(options, error):
    with pytest.raises(error):
        redray.remote(**options)(Plain)
    with pytest.raises(error):
        redray.remote(Plain).options(**options)


@pytest.mark.parametrize(
    "options",
    [
        {"max_concurrency": 0},
        {"max_pending_calls": 0},
        {"max_restarts": -1},
        {"max_restarts": None},
        {"concurrency_groups": {"io": 2}},
        {"name": "x", "get_if_exists": True},
    ],
)
def test_actor_options_ray_accepts_are_accepted(options):
    redray.remote(**options)(Plain)


@pytest.mark.parametrize(
    "options, error",
    [
        ({"num_returns": -1}, ValueError),
        ({"num_returns": 1.5}, TypeError),
        ({"max_task_retries": -2}, ValueError),
        ({"retry_exceptions": "yes"}, TypeError),
        ({"concurrency_group": 1}, TypeError),
        ({"bogus": 1}, ValueError),
    ],
)
def test_bad_method_options_fail_where_written(options, error):
    with pytest.raises(error):
        redray.method(**options)
