"""`redray list/get/summary/logs/timeline`: the state API from the command line (Ray's
`ray list ...` commands), against the cluster at --address or the one `redray start` runs
here."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from collections.abc import Iterator
from typing import Any

import click

from redray.state import api, client, metrics, objects, tasks
from redray.state import cluster as cluster_mod
from redray.state.schema import ListResult

RESOURCES = ("tasks", "actors", "objects", "nodes", "jobs", "placement-groups", "workers")
FORMATS = ("default", "json", "yaml", "table")
_GETTERS = {
    "tasks": tasks.get_task,
    "actors": cluster_mod.get_actor,
    "nodes": cluster_mod.get_node,
    "jobs": cluster_mod.get_job,
    "placement-groups": cluster_mod.get_placement_group,
}

address_option = click.option(
    "--address",
    default=None,
    metavar="URL",
    help="The cluster's Redis URL (default: the cluster `redray start` runs here).",
)
cluster_option = click.option("--cluster", default=None, help="Cluster name (default: 'default').")
timeout_option = click.option(
    "--timeout", default=client.DEFAULT_TIMEOUT_SECONDS, show_default=True, type=int,
    help="Seconds to wait for the nodes' answers.",
)  # fmt: skip


@contextlib.contextmanager
def _connected(address: str | None, cluster: str | None) -> Iterator[Any]:
    """A GCS client, or a one-line click error saying why there is none."""
    try:
        gcs, owned = client.connect(address, cluster)
    except (client.RayStateApiException, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    try:
        yield gcs
    except client.RayStateApiException as exc:
        raise click.ClickException(str(exc)) from None
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:  # Redis unreachable (redis errors are ConnectionErrors/OSErrors)
        raise click.ClickException(f"Cannot read the cluster's state: {exc}") from None
    finally:
        if owned:
            gcs.close()


def _parse_filter(text: str) -> tuple[str, str, str]:
    if "!=" in text:
        key, _, value = text.partition("!=")
        return key.strip(), "!=", value.strip()
    if "=" in text:
        key, _, value = text.partition("=")
        return key.strip(), "=", value.strip()
    raise click.BadParameter(f"{text!r}: use key=value or key!=value", param_hint="--filter")


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _yaml(data: Any) -> str:
    try:
        import yaml
    except ImportError:
        raise click.ClickException(
            "--format yaml needs PyYAML: pip install 'redray[state]'"
        ) from None
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def _table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    if not rows:
        return "(none)"
    columns = columns or list(rows[0])
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    head = "  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join([head, *lines])


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _render(data: Any, fmt: str, title: str | None = None, columns: list[str] | None = None) -> str:
    plain = _plain(data)
    if fmt == "json":
        return json.dumps(plain, indent=2)
    if fmt == "yaml":
        return _yaml(plain)
    if isinstance(plain, list) and all(isinstance(r, dict) for r in plain):
        table = _table(plain, columns)
        if fmt == "table" or title is None:
            return table
        return f"======== {title} ========\nTotal: {len(plain)}\n\n{table}"
    return _yaml(plain) if fmt == "default" else json.dumps(plain, indent=2)


def _warn(result: ListResult) -> None:
    for text in result.partial_failures + result.warnings:
        click.echo(f"Warning: {text}", err=True)
    if result.num_filtered is not None and result.num_filtered > len(result.items):
        click.echo(
            f"Warning: showing {len(result.items)} of {result.num_filtered} entries; "
            "use --limit or filters to see the others.",
            err=True,
        )


@click.command("list")
@click.argument("resource", type=click.Choice([*RESOURCES, "metrics"]))
@click.option("--filter", "-f", "filters", multiple=True, metavar="KEY=VALUE|KEY!=VALUE")
@click.option("--limit", default=100, show_default=True, type=int)
@click.option("--detail", is_flag=True, help="Every field, not only the main ones.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="default", show_default=True)
@address_option
@cluster_option
@timeout_option
def list_command(resource, filters, limit, detail, fmt, address, cluster, timeout) -> None:
    """List the cluster's RESOURCE (tasks, actors, objects, nodes, jobs, placement-groups,
    workers; or user metrics), e.g. `redray list tasks -f state=RUNNING`."""
    parsed = [_parse_filter(f) for f in filters]
    with _connected(address, cluster) as gcs:
        if resource == "metrics":
            rows = metrics.metric_rows(metrics.read_metrics(gcs))
            rows = [r for r in rows if _row_matches(r, parsed)][:limit]
            click.echo(_render(rows, fmt, "Metrics"))
            return
        result = api.list_resource(gcs, resource.replace("-", "_"), parsed, limit, detail, timeout)
    _warn(result)
    items = [_plain(item) for item in result.items]
    columns = None
    if items and not detail:
        schema = type(result.items[0])
        columns = schema.columns(detail=False)
        items = [{c: item[c] for c in columns} for item in items]
    title = f"List: {resource.replace('-', ' ')}"
    click.echo(_render(items, fmt, title, columns))


def _row_matches(row: dict[str, Any], filters: list[tuple[str, str, str]]) -> bool:
    for key, predicate, value in filters:
        if (str(row.get(key)) == value) != (predicate == "="):
            return False
    return True


@click.command("get")
@click.argument("resource", type=click.Choice(RESOURCES))
@click.argument("id")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="default", show_default=True)
@address_option
@cluster_option
@timeout_option
def get_command(resource, id, fmt, address, cluster, timeout) -> None:  # noqa: A002
    """Show one RESOURCE by its ID, with every field."""
    with _connected(address, cluster) as gcs:
        if resource in ("workers", "objects"):
            key = "worker_id" if resource == "workers" else "object_id"
            result = api.list_resource(gcs, resource, [(key, "=", id)], 10_000, True, timeout)
            _warn(result)
            found: Any = result.items if resource == "objects" else result.items[:1]
        else:
            found = _GETTERS[resource](gcs, id)
    if not found:
        raise click.ClickException(f"No {resource.rstrip('s').replace('-', ' ')} {id!r} found.")
    data = found[0] if isinstance(found, list) and resource != "objects" else found
    click.echo(_render(data, "yaml" if fmt in ("default", "table") else fmt))


@click.command("summary")
@click.argument("resource", type=click.Choice(("tasks", "actors", "objects")))
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="default", show_default=True)
@address_option
@cluster_option
@timeout_option
def summary_command(resource, fmt, address, cluster, timeout) -> None:
    """Counts of the cluster's tasks, actors or objects, by name and state."""
    with _connected(address, cluster) as gcs:
        if resource == "tasks":
            for text in tasks.dropped_warnings(gcs):
                click.echo(f"Warning: {text}", err=True)
            data = tasks.summarize_tasks(gcs)
            rows = [
                {"name": name, "type": e["type"], **{"state_counts": e["state_counts"]}}
                for name, e in data["summary"].items()
            ]
        elif resource == "actors":
            data = cluster_mod.summarize_actors(gcs)
            rows = [
                {"class_name": name, "state_counts": e["state_counts"]}
                for name, e in data["summary"].items()
            ]
        else:
            result = api.list_resource(gcs, "objects", None, api.MAX_LIMIT, True, timeout)
            _warn(result)
            data = objects.summarize(result.items)
            rows = [{"callsite": k, **v} for k, v in data["summary"].items()]
    if fmt in ("json", "yaml"):
        click.echo(_render(data, fmt))
        return
    totals = {k: v for k, v in data.items() if k not in ("summary", "summary_by")}
    click.echo(f"======== {resource.capitalize()} Summary ========")
    click.echo("\n".join(f"{k}: {v}" for k, v in totals.items()))
    click.echo("")
    click.echo(_table(rows))


@click.command("logs")
@click.argument("args", nargs=-1)
@click.option("--id", "target_id", default=None, help="With actor, task or worker: its id.")
@click.option("--node-id", default=None)
@click.option("--node-ip", default=None)
@click.option("--pid", default=None, type=int, help="A worker's log, by its process id.")
@click.option("--tail", default=-1, type=int, help="Only the last N lines (default: all).")
@click.option("--follow", "-f", is_flag=True, help="Keep printing what is appended.")
@click.option("--err", is_flag=True, help="Worker logs: stderr instead of stdout.")
@click.option("--attempt-number", default=0, type=int)
@address_option
@cluster_option
@timeout_option
def logs_command(
    args, target_id, node_id, node_ip, pid, tail, follow, err, attempt_number, address, cluster,
    timeout,
) -> None:  # fmt: skip
    """A node's log files: `redray logs` lists them, `redray logs GLOB` prints the one file
    matching (or lists several), `redray logs actor|task|worker --id ID` prints that
    actor's, task's or worker's output."""
    kind = args[0] if args and args[0] in ("actor", "task", "worker", "cluster") else None
    rest = args[1:] if kind else args
    suffix = "err" if err else "out"
    with _connected(address, cluster) as gcs:
        common = {"timeout": timeout, "tail": tail, "follow": follow, "suffix": suffix}
        if kind in ("actor", "task", "worker"):
            if not target_id:
                raise click.UsageError(f"`redray logs {kind}` needs --id")
            if kind == "actor":
                chunks = api.log_chunks(gcs, actor_id=target_id, **common)
            elif kind == "task":
                chunks = api.log_chunks(
                    gcs, task_id=target_id, attempt_number=attempt_number, **common
                )
            else:
                found = api.list_resource(
                    gcs, "workers", [("worker_id", "=", target_id)], 1, True, timeout
                ).items
                if not found:
                    raise click.ClickException(f"No worker {target_id!r} found.")
                worker = found[0]
                chunks = api.log_chunks(
                    gcs,
                    node_id=worker.node_id,
                    filename=f"worker-{worker.worker_id}-{worker.pid}.{suffix}",
                    **{k: v for k, v in common.items() if k != "suffix"},
                )
            _print_chunks(chunks)
            return
        if pid is not None:
            _print_chunks(api.log_chunks(gcs, node_id=node_id, node_ip=node_ip, pid=pid, **common))
            return
        pattern = rest[0] if rest else "*"
        listed = api.logs_of(gcs, node_id, node_ip, pattern, timeout)
        names = sorted(n for group in listed.values() for n in group)
        if len(names) == 1 and rest:
            common.pop("suffix")
            _print_chunks(
                api.log_chunks(gcs, node_id=node_id, node_ip=node_ip, filename=names[0], **common)
            )
            return
        if not names:
            raise click.ClickException(f"No log file matches {pattern!r}.")
        for category, files in sorted(listed.items()):
            click.echo(f"{category}:")
            for name in files:
                click.echo(f"  {name}")


def _print_chunks(chunks: Any) -> None:
    try:
        for chunk in chunks:
            sys.stdout.write(chunk)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass


@click.command("timeline")
@click.option("--output", "-o", default=None, metavar="FILE", help="Where to write the JSON.")
@address_option
@cluster_option
def timeline_command(output, address, cluster) -> None:
    """The tasks as Chrome trace JSON (open in chrome://tracing or ui.perfetto.dev): one row
    per worker, one slice per task."""
    with _connected(address, cluster) as gcs:
        trace = api.timeline.chrome_trace(gcs)
    if output is None:
        output = "redray-timeline.json"
    with open(output, "w") as f:
        json.dump(trace, f)
    slices = sum(1 for e in trace if e.get("ph") == "X")
    click.echo(f"Wrote {slices} task slices to {output}.")


COMMANDS = (list_command, get_command, summary_command, logs_command, timeline_command)
