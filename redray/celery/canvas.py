"""Celery's canvas: signatures, ``chain``, ``group`` and ``chord``.

A workflow is enqueued in one transaction: every job is written at once, the later steps
parked as waiting. The script that stores a step's result releases the next step (exactly
once), and a chord's callback is released by the header member whose result completes an
atomic count in Redis, so it fires once even when header consumers die and their jobs are
run again.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from redray.celery.result import AsyncResult, GroupResult
from redray.durable.jobs import JobSpec

if TYPE_CHECKING:
    from redray.celery.app import Celery
    from redray.celery.task import Task


class Signature:
    """A task call to make later: ``add.s(2, 2)``; immutable (``.si``) ones ignore the
    previous step's result."""

    def __init__(
        self,
        task: str | Any,
        args: Any = (),
        kwargs: Any = None,
        options: dict | None = None,
        app: Celery | None = None,
        task_obj: Task | None = None,
        immutable: bool = False,
    ):
        from redray.celery.app import current_app

        if not isinstance(task, str):
            task_obj = task
            task = task.name
        self.app = app or (task_obj.app if task_obj is not None else current_app())
        self.task_name = task
        self._task = task_obj
        self.args = tuple(args or ())
        self.kwargs = dict(kwargs or {})
        self.options = dict(options or {})
        self.immutable = immutable

    def __repr__(self) -> str:
        args = ", ".join([*map(repr, self.args), *(f"{k}={v!r}" for k, v in self.kwargs.items())])
        return f"{self.task_name}({args}){'!' if self.immutable else ''}"

    @property
    def task(self) -> Task:
        from redray.celery.task import Task

        if self._task is None:
            self._task = self.app.tasks.get(self.task_name) or Task.named(self.app, self.task_name)
        return self._task

    def clone(self, args: Any = (), kwargs: Any = None, **options: Any) -> Signature:
        """A copy with args prepended (unless immutable), kwargs and options merged."""
        new_args = self.args if self.immutable else tuple(args or ()) + self.args
        return Signature(
            self.task_name,
            new_args,
            {**self.kwargs, **(kwargs or {})} if not self.immutable else self.kwargs,
            {**self.options, **options},
            app=self.app,
            task_obj=self._task,
            immutable=self.immutable,
        )

    def set(self, immutable: bool | None = None, **options: Any) -> Signature:
        if immutable is not None:
            self.immutable = immutable
        self.options.update(options)
        return self

    def spec(self, pass_parent: bool = False) -> JobSpec:
        pass_parent = pass_parent and not self.immutable
        spec = self.task.make_spec(self.args, self.kwargs, self.options, leading=int(pass_parent))
        spec.options.pass_parent = pass_parent
        return spec

    def apply_async(self, args: Any = (), kwargs: Any = None, **options: Any) -> AsyncResult:
        sig = self.clone(args, kwargs, **options)
        return sig.task.apply_async(sig.args, sig.kwargs, **sig.options)

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult:
        return self.apply_async(args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        sig = self.clone(args, kwargs)
        return sig.task(*sig.args, **sig.kwargs)

    def __or__(self, other: Any) -> chain:
        return chain(self, other)


class group:  # noqa: N801 - Celery's name
    """Run signatures in parallel: ``group(add.s(i, i) for i in range(10))()``."""

    def __init__(self, *tasks: Any, app: Celery | None = None):
        if len(tasks) == 1 and not isinstance(tasks[0], Signature):
            tasks = tuple(tasks[0])
        for sig in tasks:
            if not isinstance(sig, Signature):
                raise NotImplementedError(
                    f"a group of {type(sig).__name__} is not supported by redray: groups hold "
                    "task signatures"
                )
        self.tasks = list(tasks)
        self.app = app or (self.tasks[0].app if self.tasks else None)

    def __repr__(self) -> str:
        return f"group({self.tasks!r})"

    def apply_async(self, args: Any = (), kwargs: Any = None, **options: Any) -> GroupResult:
        return _Workflow([self], args, kwargs, options).submit()

    def delay(self, *args: Any, **kwargs: Any) -> GroupResult:
        return self.apply_async(args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> GroupResult:
        return self.apply_async(args, kwargs)

    def __or__(self, other: Any) -> chain:
        return chain(self, other)


class chain:  # noqa: N801 - Celery's name
    """Run signatures one after the other, each getting the previous result first:
    ``chain(add.s(2, 2), mul.s(4))()``. A group followed by a signature is a chord."""

    def __init__(self, *tasks: Any, app: Celery | None = None):
        if len(tasks) == 1 and not isinstance(tasks[0], (Signature, group, chain)):
            tasks = tuple(tasks[0])
        steps: list[Signature | group] = []
        for step in tasks:
            if isinstance(step, chain):
                steps += step.tasks
            elif isinstance(step, chord):
                steps += [step.header, step.body]
            elif isinstance(step, (Signature, group)):
                steps.append(step)
            else:
                raise TypeError(f"a chain holds signatures and groups, got {step!r}")
        self.tasks = steps
        self.app = app

    def __repr__(self) -> str:
        return " | ".join(map(repr, self.tasks))

    def apply_async(self, args: Any = (), kwargs: Any = None, **options: Any) -> Any:
        return _Workflow(self.tasks, args, kwargs, options).submit()

    def delay(self, *args: Any, **kwargs: Any) -> Any:
        return self.apply_async(args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.apply_async(args, kwargs)

    def __or__(self, other: Any) -> chain:
        return chain(self, other)


class chord:  # noqa: N801 - Celery's name
    """Run a header group, then the body with the list of its results:
    ``chord(add.s(i, i) for i in range(10))(tsum.s())``."""

    def __init__(self, header: Any, body: Signature | None = None, app: Celery | None = None):
        self.header = header if isinstance(header, group) else group(header)
        self.body = body
        self.app = app

    def __call__(self, body: Signature | None = None, **options: Any) -> AsyncResult:
        return self.apply_async((), body=body, **options)

    def apply_async(
        self, args: Any = (), kwargs: Any = None, body: Signature | None = None, **options: Any
    ) -> AsyncResult:
        body = body or self.body
        if body is None:
            raise TypeError("a chord needs a body (callback) signature")
        return _Workflow([self.header, body], args, kwargs, options).submit()

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult:
        return self.apply_async(args, kwargs)


def signature(varies: Any, *args: Any, **kwargs: Any) -> Signature:
    """Celery's ``signature(name_or_sig, args=, kwargs=, ...)``."""
    if isinstance(varies, Signature):
        return varies.clone()
    return Signature(varies, *args, **kwargs)


class _Workflow:
    """Jobs for a sequence of steps (signatures or groups), linked and enqueued at once."""

    def __init__(self, steps: list[Any], args: Any, kwargs: Any, options: dict[str, Any]):
        if not steps:
            raise ValueError("an empty workflow")
        self.steps = steps
        self.args = tuple(args or ())
        self.kwargs = dict(kwargs or {})
        self.options = options

    def submit(self) -> Any:
        for before, after in zip(self.steps, self.steps[1:], strict=False):
            if isinstance(before, group) and isinstance(after, group):
                raise NotImplementedError(
                    "a group directly followed by a group is not supported by redray"
                )
        app = None
        nodes: list[list[JobSpec]] = []
        for index, step in enumerate(self.steps):
            sigs = step.tasks if isinstance(step, group) else [step]
            if index == 0:
                sigs = [s.clone(self.args, self.kwargs, **self.options) for s in sigs]
            specs = [s.spec(pass_parent=index > 0) for s in sigs]
            app = app or (sigs[0].app if sigs else None)
            nodes.append(specs)
        if app is None:
            return GroupResult(str(uuid.uuid4()), [])
        chords: list[tuple[str, int, str]] = []
        for index in range(1, len(nodes)):
            before, after = nodes[index - 1], nodes[index]
            was_group = isinstance(self.steps[index - 1], group)
            for spec in after:
                spec.waiting = True
            if was_group:
                (callback,) = after
                chord_id = str(uuid.uuid4())
                callback.header = [spec.job_id for spec in before]
                for spec in before:
                    spec.chord = chord_id
                if not before:
                    callback.waiting = False
                else:
                    chords.append((chord_id, len(before), callback.job_id))
            else:
                (previous,) = before
                previous.children = [*previous.children, *(spec.job_id for spec in after)]
        app.client.workflow([spec for specs in nodes for spec in specs], chords)
        parent = None
        result: Any = None
        for step, specs in zip(self.steps, nodes, strict=True):
            if isinstance(step, group):
                result = GroupResult(
                    str(uuid.uuid4()),
                    [AsyncResult(s.job_id, app=app, task_name=s.name) for s in specs],
                    app=app,
                )
            else:
                result = AsyncResult(
                    specs[0].job_id, app=app, task_name=specs[0].name, parent=parent
                )
            parent = result
        return result
