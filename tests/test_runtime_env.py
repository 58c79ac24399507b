"""runtime_env beyond env_vars: working_dir, py_modules, pip, merging, limits, setup errors.

Real cluster, real worker processes; pip environments install wheels the tests build
themselves (`--no-index`: nothing comes from the network).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from conftest import last_json, run_driver
from wheels import build_wheel

import redray
from redray.exceptions import RuntimeEnvSetupError
from redray.runtime_env import packaging, spec


def make_project(root: Path) -> Path:
    """A working_dir: a module, a data file, ignored files, a .git folder."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "projmod.py").write_text("ANSWER = 42\n")
    (root / "data").mkdir()
    (root / "data" / "table.csv").write_text("a,b\n1,2\n")
    (root / ".gitignore").write_text("secrets.txt\nbuild/\n")
    (root / "secrets.txt").write_text("password")
    (root / "build").mkdir()
    (root / "build" / "artifact.bin").write_bytes(b"x" * 100)
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "logs").mkdir()
    (root / "logs" / "run.log").write_text("noise")
    return root


def shipped_files() -> list[str]:
    """Inside a task: every file of its working directory, relative to it."""
    found = []
    for dirpath, _, filenames in os.walk("."):
        for name in filenames:
            found.append(os.path.relpath(os.path.join(dirpath, name), "."))
    return sorted(found)


def test_working_dir_task_imports_its_module_and_reads_its_data(ray_start, tmp_path):
    project = make_project(tmp_path / "proj")

    @redray.remote(runtime_env={"working_dir": str(project), "excludes": ["logs/"]})
    def use_project():
        import sys

        import projmod

        with open("data/table.csv") as f:
            table = f.read()
        return projmod.ANSWER, table, shipped_files(), os.getcwd() in sys.path

    @redray.remote
    def without_env():
        import projmod  # noqa: F401

    answer, table, files, on_path = redray.get(use_project.remote(), timeout=30)
    assert answer == 42 and table == "a,b\n1,2\n" and on_path
    # .gitignore'd files, anything under .git and `excludes` matches are never shipped.
    assert files == [".gitignore", "data/table.csv", "projmod.py"]
    # Workers are pooled per environment: a task without it cannot see the module.
    with pytest.raises(ModuleNotFoundError):
        redray.get(without_env.remote(), timeout=30)


def test_py_modules_and_working_dir_in_an_actor(ray_start, tmp_path):
    package = tmp_path / "libs" / "helperpkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("def greet(name):\n    return 'hello ' + name\n")
    project = make_project(tmp_path / "proj")

    @redray.remote
    class Greeter:
        def greet(self):
            import helperpkg
            import projmod

            return helperpkg.greet("actor"), projmod.ANSWER

    env = {"working_dir": str(project), "py_modules": [str(package)]}
    greeter = Greeter.options(runtime_env=env).remote()
    assert redray.get(greeter.greet.remote(), timeout=30) == ("hello actor", 42)


def test_a_missing_working_dir_is_refused_at_the_call(ray_start, tmp_path):
    @redray.remote
    def f():
        return 1

    with pytest.raises(ValueError, match="does not exist"):
        f.options(runtime_env={"working_dir": str(tmp_path / "nowhere")}).remote()


def test_an_oversized_working_dir_is_refused_naming_its_largest_files(
    ray_start, tmp_path, monkeypatch
):
    project = make_project(tmp_path / "proj")
    (project / "data" / "huge.parquet").write_bytes(b"\0" * 60_000)
    (project / "model.ckpt").write_bytes(b"\0" * 30_000)
    monkeypatch.setenv(packaging.MAX_SIZE_ENV, "50000")

    @redray.remote
    def f():
        return sorted(os.listdir("data"))

    with pytest.raises(ValueError) as refused:
        f.options(runtime_env={"working_dir": str(project)}).remote()
    message = str(refused.value)
    assert "data/huge.parquet" in message and "model.ckpt" in message
    assert message.index("data/huge.parquet") < message.index("model.ckpt")  # largest first
    assert "excludes" in message and ".gitignore" in message
    # Leaving the big files out makes it fit.
    env = {"working_dir": str(project), "excludes": ["*.parquet", "/model.ckpt"]}
    assert redray.get(f.options(runtime_env=env).remote(), timeout=30) == ["table.csv"]


def test_pip_env_from_a_wheel_is_built_once_and_envs_run_side_by_side(ray_start, tmp_path):
    one = build_wheel(tmp_path, "rdtwheel", "1.0", "VERSION = 'one'\n")
    (tmp_path / "v2").mkdir()
    two = build_wheel(tmp_path / "v2", "rdtwheel", "2.0", "VERSION = 'two'\n")

    # max_calls=1: every call gets a new worker, so the second call shows the start of a
    # worker in the cached virtualenv rather than the reuse of a live one.
    @redray.remote(max_calls=1)
    def version():
        import sys

        import rdtwheel

        return rdtwheel.VERSION, sys.prefix

    env_one = {"pip": ["--no-index", one]}
    start = time.monotonic()
    first = redray.get(version.options(runtime_env=env_one).remote(), timeout=120)
    built = time.monotonic() - start
    start = time.monotonic()
    again = redray.get(version.options(runtime_env=env_one).remote(), timeout=60)
    cached = time.monotonic() - start
    print(f"pip env: first task {built:.2f} s (venv built), second {cached:.2f} s (cached)")
    assert first[0] == again[0] == "one" and first[1] == again[1]
    assert cached < built / 3, (built, cached)

    env_two = {"pip": ["--no-index", two]}
    refs = [
        version.options(runtime_env=env_two).remote(),
        version.options(runtime_env=env_one).remote(),
    ]
    (v_two, prefix_two), (v_one, prefix_one) = redray.get(refs, timeout=120)
    assert (v_two, v_one) == ("two", "one") and prefix_two != prefix_one


def test_a_failed_pip_install_raises_runtime_env_setup_error_with_the_installer_output(
    ray_start,
):
    @redray.remote
    def f():
        return 1

    env = {"pip": ["--no-index", "redray-no-such-package-anywhere==9.9"]}
    with pytest.raises(RuntimeEnvSetupError) as failed:
        redray.get(f.options(runtime_env=env).remote(), timeout=60)
    assert "redray-no-such-package-anywhere" in str(failed.value)
    assert "No matching distribution" in str(failed.value)  # pip's own words


def test_job_env_is_merged_under_task_env_and_inherited_by_nested_tasks(tmp_path):
    make_project(tmp_path / "proj")
    out = run_driver(
        f"""
        import json, os
        import redray
        redray.init(num_cpus=2, runtime_env={{
            "working_dir": {str(tmp_path / "proj")!r},
            "env_vars": {{"FROM_JOB": "job", "BOTH": "job"}},
        }})

        @redray.remote
        def inner():
            import projmod
            return projmod.ANSWER, os.environ.get("FROM_TASK")

        @redray.remote
        def outer():
            import projmod
            return (projmod.ANSWER, os.environ["FROM_JOB"], os.environ["BOTH"],
                    redray.get(inner.remote()))

        env = {{"env_vars": {{"FROM_TASK": "task", "BOTH": "task"}}}}
        print(json.dumps(redray.get(outer.options(runtime_env=env).remote(), timeout=30)))
        """,
        timeout=90,
    )
    # env_vars merge (the task's win), working_dir comes from the job, children inherit.
    assert last_json(out.stdout) == [42, "job", "task", [42, "task"]]


def test_merge_and_validation_follow_rays_rules():
    parent = {"working_dir": "gcs://a", "env_vars": {"A": "1", "B": "1"}, "pip": ["x"]}
    child = {"env_vars": {"B": "2"}, "pip": ["y"]}
    assert spec.merge(parent, child) == {
        "working_dir": "gcs://a",
        "env_vars": {"A": "1", "B": "2"},
        "pip": ["y"],
    }
    assert spec.merge(None, child) == child and spec.merge(parent, None) == parent
    with pytest.raises(ValueError, match="conda"):
        spec.validate({"conda": "env"})
    with pytest.raises(TypeError):
        spec.validate({"py_modules": "not-a-list"})
    with pytest.raises(ValueError):
        spec.validate({"config": {"setup_timeout_seconds": 0}})


def test_nested_ignore_files_apply_below_their_own_directory(tmp_path):
    root = tmp_path / "proj"
    (root / "pkg" / "cache").mkdir(parents=True)
    (root / "pkg" / ".gitignore").write_text("*.tmp\n!keep.tmp\ncache/\n")
    (root / "pkg" / "a.tmp").write_text("x")
    (root / "pkg" / "keep.tmp").write_text("x")
    (root / "pkg" / "cache" / "blob").write_text("x")
    (root / "top.tmp").write_text("x")  # above the .gitignore: kept
    (root / ".rayignore").write_text("notes.md\n")
    (root / "notes.md").write_text("x")
    (root / "sub" / ".git").mkdir(parents=True)  # a nested repository's .git too
    (root / "sub" / ".git" / "config").write_text("x")
    (root / "sub" / "code.py").write_text("x")
    shipped = [rel for rel, _ in packaging.collect_files(root, ["*.log"])]
    assert shipped == [
        ".rayignore",
        "pkg/.gitignore",
        "pkg/keep.tmp",
        "sub/code.py",
        "top.tmp",
    ]
    # Equal content makes an equal package (content-addressed), whatever the mtimes.
    first = packaging.zip_directory(root, [])
    os.utime(root / "top.tmp", (0, 0))
    assert packaging.zip_directory(root, []) == first
