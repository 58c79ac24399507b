"""The "ray" joblib backend (redray.util.joblib): joblib and scikit-learn work on the cluster."""

from __future__ import annotations

import os

import joblib
import numpy as np
import pytest

import redray
from redray.util.joblib import register_ray

pytestmark = [pytest.mark.usefixtures("ray_start"), pytest.mark.timeout(90)]

register_ray()


# The functions the pool runs are defined inside the tests (so pickled by value) or built
# in: an actor that had to import this module to find them would import pytest for nothing.


@pytest.mark.timeout(180)  # scikit-learn's import alone takes seconds in each actor
def test_grid_search_on_the_cluster_finds_what_a_sequential_search_finds():
    # (imported here: scikit-learn takes seconds to import, which only this test needs)
    from sklearn.datasets import load_iris
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    features, labels = load_iris(return_X_y=True)
    grid = {"C": [0.1, 10.0], "gamma": [0.01, 1.0]}
    sequential = GridSearchCV(SVC(), grid, cv=3, n_jobs=1).fit(features, labels)
    with joblib.parallel_backend("ray"):
        distributed = GridSearchCV(SVC(), grid, cv=3, n_jobs=-1).fit(features, labels)
    assert distributed.best_params_ == sequential.best_params_
    assert distributed.best_score_ == sequential.best_score_
    assert len(distributed.cv_results_["params"]) == 4


def test_batches_run_in_pool_actors_sized_by_the_cluster():
    def where_am_i(_):
        return os.getpid(), redray.get_runtime_context().get_actor_id()

    with joblib.parallel_backend("ray"):
        assert joblib.effective_n_jobs(-1) == 2  # the cluster's CPUs
        assert joblib.effective_n_jobs(8) == 2
        places = joblib.Parallel(n_jobs=-1)(joblib.delayed(where_am_i)(i) for i in range(20))
    pids = {pid for pid, _ in places}
    assert os.getpid() not in pids and len(pids) <= 2
    assert all(actor_id for _, actor_id in places)


def test_large_arrays_are_stored_once_and_read_in_place():
    def total(array, offset):
        return float(array.sum()) + offset, array.flags.writeable

    big = np.arange(300_000, dtype=np.float64)  # 2.4 MB: above the 1 MB threshold
    small = np.ones(10)
    with joblib.parallel_backend("ray", n_jobs=2):
        results = joblib.Parallel()(
            joblib.delayed(total)(array, i) for i, array in enumerate([big, small, big])
        )
    expected = float(big.sum())
    # The stored copy arrives read-only (zero-copy from the object store), as joblib's
    # memory-mapped arrays do; small ones are pickled with the call as usual.
    assert results == [(expected, False), (10.0 + 1, True), (expected + 2, False)]


def test_errors_and_generators_behave_as_with_joblibs_own_backends():
    with joblib.parallel_backend("ray", n_jobs=2):
        with pytest.raises(ValueError, match="invalid literal"):
            joblib.Parallel()(joblib.delayed(int)(text) for text in ["1", "two", "3"])
        lazily = joblib.Parallel(return_as="generator")(
            joblib.delayed(int)(str(i)) for i in range(6)
        )
        assert list(lazily) == list(range(6))
