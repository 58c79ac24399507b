"""The `redray` command: start and join nodes, stop them, show the cluster's state.

    redray start --head [--port 6379] [--num-cpus N] ...   # Redis + GCS + head raylet
    redray node --redis redis://:PASSWORD@HOST:PORT ...    # join another machine
    redray status [--address URL]                          # nodes and resources
    redray stop [--force] [--temp-dir DIR]                 # stop what this machine started

Redis URLs: redis://, rediss:// (TLS), unix://, and
redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE for a Redis run under Sentinel.
Nodes started here outlive the command (their raylets run in their own sessions), and so
does the Redis `redray start --head` runs (its own process, with AOF persistence). What
`redray start` / `redray node` started is recorded in the current-cluster file
(`redray.node.launch.CURRENT_CLUSTER`, mode 0600, it holds the Redis password), which is how
`redray.init(address="auto")` finds the cluster and how `redray stop` finds the nodes. Temp
roots (`ROOT_DIR` and any --temp-dir) another user could write are refused (see
redray/node/launch.py).
Also runnable as `python -m redray.cli`.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import math
import os
import re
import secrets
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import click
import psutil
import redis

from redray.dashboard import cli as dashboard_cli
from redray.gcs import DEFAULT_CLUSTER, URL_SCHEMES, Gcs
from redray.node import launch as node

MIN_OBJECT_STORE_MEMORY = 1 << 20
LOG_TAIL_LINES = 20


# -- small helpers ------------------------------------------------------------------------
def _parse_resources(text: str | None) -> dict[str, float]:
    """The --resources JSON as {name: amount}; a clear click error for anything else."""
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise click.BadParameter(
            f"not valid JSON ({exc}): {text!r}", param_hint="--resources"
        ) from None
    if not isinstance(value, dict):
        raise click.BadParameter(
            "must be a JSON object of resource name to amount, e.g. '{\"custom\": 2}'",
            param_hint="--resources",
        )
    resources: dict[str, float] = {}
    for name, amount in value.items():
        if name in ("CPU", "GPU"):
            raise click.BadParameter(
                f"use --num-{name.lower()}s instead of {name!r} in --resources",
                param_hint="--resources",
            )
        if not name or name.startswith("node:"):
            raise click.BadParameter(f"invalid resource name {name!r}", param_hint="--resources")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)):
            raise click.BadParameter(
                f"the amount of {name!r} must be a number, got {amount!r}",
                param_hint="--resources",
            )
        if amount < 0 or not math.isfinite(amount):
            raise click.BadParameter(
                f"the amount of {name!r} must be a non-negative number, got {amount!r}",
                param_hint="--resources",
            )
        resources[name] = float(amount)
    return resources


def _check_ip(ip: str) -> str:
    """An address of this machine others can connect to (what --node-ip-address must be)."""
    try:
        node.check_node_ip(ip)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--node-ip-address") from None
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family) as sock:
            sock.bind((ip, 0))
    except OSError as exc:
        raise click.BadParameter(
            f"cannot listen on {ip} ({exc.strerror}): is it an address of this machine?",
            param_hint="--node-ip-address",
        ) from None
    return ip


def _check_port_free(ip: str, port: int) -> None:
    """Fail early, and clearly, when the embedded Redis could not bind its port."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family) as sock:
        try:
            sock.bind((ip, port))
        except OSError:
            raise click.UsageError(
                f"Port {port} on {ip} is already in use (another Redis or redray head?). "
                "Pick another with --port, or use that Redis with --redis URL."
            ) from None


def _redact(url: str) -> str:
    """A Redis URL with its passwords hidden (the server's, and a Sentinel URL's
    sentinel_password), for messages."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        user = userinfo.split(":", 1)[0]
        parts = parts._replace(netloc=f"{user}:***@{hosts}")
    if "password=" in parts.query:
        query = re.sub(r"(^|&)(\w*password)=[^&]*", r"\1\2=***", parts.query)
        parts = parts._replace(query=query)
    return urlunsplit(parts)


def _normalize_url(url: str, param_hint: str = "--redis") -> str:
    """redis://HOST:PORT from HOST:PORT; a click error for a URL of another scheme."""
    if "://" not in url:
        return "redis://" + url
    if not url.startswith(URL_SCHEMES):
        raise click.BadParameter(
            f"{_redact(url)!r} is not a Redis URL: use redis://[:PASSWORD@]HOST:PORT or "
            "redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE",
            param_hint=param_hint,
        )
    return url


def _connect_gcs(url: str, cluster: str, param_hint: str = "--redis") -> Gcs:
    """A GCS client for url, checked with PING; click errors for bad or unreachable URLs."""
    url = _normalize_url(url, param_hint)
    try:
        gcs = Gcs(url, cluster)
    except ValueError as exc:
        raise click.BadParameter(
            f"invalid Redis URL {_redact(url)!r}: {exc}", param_hint=param_hint
        ) from None
    try:
        gcs.ping()
    except redis.AuthenticationError as exc:
        gcs.close()
        raise click.ClickException(
            f"Redis at {_redact(url)} refused the password ({str(exc).rstrip('.')}). "
            "Use the redis://:PASSWORD@HOST:PORT address `redray start --head` printed."
        ) from None
    except redis.RedisError as exc:
        gcs.close()
        raise click.ClickException(
            f"Cannot reach Redis at {_redact(url)}: {str(exc).rstrip('.')}."
        ) from None
    return gcs


def _log_tail(session_dir: str) -> str:
    path = os.path.join(session_dir, "logs", "raylet.log")
    try:
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()[-LOG_TAIL_LINES:]
    except OSError:
        return ""
    return "\n".join("    " + line for line in lines)


@contextlib.contextmanager
def _temp_root_errors() -> Iterator[None]:
    """An unsafe temp root as a click error (its message says what is wrong and what to do)."""
    try:
        yield
    except node.UnsafeTempDirError as exc:
        raise click.ClickException(str(exc)) from None


def _session_dir(temp_dir: str | None) -> str:
    with _temp_root_errors():
        try:
            return node.new_session_dir(temp_dir)
        except node.UnsafeTempDirError:
            raise
        except OSError as exc:
            raise click.BadParameter(
                f"cannot make a session directory in {temp_dir!r}: {exc.strerror}",
                param_hint="--temp-dir",
            ) from None


def _start(temp_dir: str | None = None, **kwargs: Any) -> node.StartedNode:
    """`node.start_node` for a daemonized node, its failures as click errors with the log."""
    with _temp_root_errors():
        node.trusted_root()  # where the node is recorded: checked before it starts
    session_dir = _session_dir(temp_dir)
    try:
        return node.start_node(private=False, session_dir=session_dir, **kwargs)
    except (RuntimeError, OSError, ValueError) as exc:
        tail = _log_tail(session_dir)
        message = f"{exc}" + (f"\n  last lines of the log:\n{tail}" if tail else "")
        raise click.ClickException(message) from None


# -- the current-cluster file -------------------------------------------------------------
@contextlib.contextmanager
def _cluster_file_lock() -> Iterator[None]:
    """Serialize read-modify-write of the current-cluster file between commands."""
    with _temp_root_errors():
        node.trusted_root()
        # (it outlives the commands, so it cannot be created exclusively; the root is ours)
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(node.CURRENT_CLUSTER + ".lock", flags, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _read_record() -> dict[str, Any] | None:
    """The current-cluster file as written, even when its nodes are gone (None if absent)."""
    return node.read_record()


def _record_node(
    started: node.StartedNode,
    gcs_url: str,
    cluster: str,
    head: bool,
    extra: dict[str, Any] | None = None,
) -> None:
    """Add a node this machine started to the current-cluster file.

    A head always becomes the cluster `address="auto"` connects to. A joining node does
    only when no live cluster is recorded; otherwise its pid is added so `redray stop`
    stops it too.
    """
    entry = {
        "pid": started.info["pid"],
        "node_id": started.info["node_id"],
        "session_dir": started.session_dir,
        "gcs_url": gcs_url,
        "cluster": cluster,
        "head": head,
    }
    if started.redis is not None:  # the Redis this head runs: `redray stop` stops it too
        entry["redis_pid"] = started.redis.pid
        entry["redis_started"] = _create_time(started.redis.pid)
    for name, process in (extra or {}).items():  # its dashboard, its metrics exporter
        entry[f"{name}_pid"] = process.pid
        entry[f"{name}_started"] = _create_time(process.pid)
    with _cluster_file_lock():
        record = _read_record()
        live = node.read_current_cluster() is not None
        if record is None or not live:
            record = {"nodes": []}
        if head or not record.get("gcs_url"):
            record.update(gcs_url=gcs_url, cluster=cluster, session_dir=started.session_dir)
            record["node_ip_address"] = started.info["node_ip_address"]
        record["nodes"] = [*record.get("nodes", []), entry]
        record["pids"] = [n["pid"] for n in record["nodes"]]
        node.write_current_cluster(record)


# -- finding and stopping node processes -------------------------------------------------
def _is_raylet(proc: psutil.Process) -> bool:
    try:
        cmdline = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return "redray.raylet" in cmdline and "-m" in cmdline


def _started_here(proc: psutil.Process, root: str) -> bool:
    """A daemonized raylet of the temp root `root`: it leads its own session and logs into
    `root/session_*/logs/raylet.log`.

    Raylets of private clusters (`redray.init()` with no address) share their driver's
    session, so `redray stop` leaves them to their drivers; raylets under other temp roots
    (other TMPDIRs, other --temp-dirs: other checkouts' or test runs' clusters) are left to
    whoever started them.
    """
    try:
        if os.getsid(proc.pid) != proc.pid:
            return False
        log_path = os.readlink(f"/proc/{proc.pid}/fd/2")
    except OSError:  # gone, not ours, or no /proc to tell where it logs
        return False
    return os.path.basename(log_path) == "raylet.log" and _in_session_dir(
        os.path.dirname(log_path), "logs", root
    )


def _in_session_dir(path: str, subdir: str, root: str) -> bool:
    """Whether path is `root/session_*/subdir`: a node's directory in the temp root."""
    session = os.path.dirname(path)
    return (
        os.path.basename(path) == subdir
        and os.path.basename(session).startswith("session_")
        and os.path.dirname(session) == os.path.realpath(root)
    )


def _own_processes() -> Iterator[psutil.Process]:
    """This user's processes."""
    uid = os.getuid()
    for proc in psutil.process_iter(["uids"]):
        if proc.info["uids"] is not None and proc.info["uids"].real == uid:
            yield proc


def _node_processes(record: dict[str, Any] | None, root: str) -> list[psutil.Process]:
    """Raylets to stop: those recorded in the file, and daemonized ones of the temp root
    `root` found by a scan."""
    found: dict[int, psutil.Process] = {}
    for pid in (record or {}).get("pids", []):
        try:
            proc = psutil.Process(pid)
        except psutil.NoSuchProcess:
            continue
        if _is_raylet(proc):
            found[pid] = proc
    for proc in _own_processes():
        if proc.pid not in found and _is_raylet(proc) and _started_here(proc, root):
            found[proc.pid] = proc
    return list(found.values())


def _same_process(proc: psutil.Process, recorded: float | None) -> bool:
    """Whether proc is the process recorded as started at `recorded` (not a reuse of its
    pid). Start times are compared within a second: psutil derives them from the boot time,
    which the kernel reports again in each process and may adjust between two readings."""
    return recorded is not None and abs(proc.create_time() - recorded) < 1.0


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _redis_processes(record: dict[str, Any] | None, root: str) -> list[psutil.Process]:
    """The redis-servers that heads started here run: those recorded with their node (a
    recorded pid now used by another process is left alone), and, found by a scan, those
    leading their own session with their data in `root/session_*/redis` (a head whose record
    was lost)."""
    found: dict[int, psutil.Process] = {}
    for entry in (record or {}).get("nodes", []):
        pid = entry.get("redis_pid")
        if not pid:
            continue
        try:
            proc = psutil.Process(pid)
            if "redis-server" in proc.name() and _same_process(proc, entry.get("redis_started")):
                found[pid] = proc
        except psutil.Error:
            continue
    for proc in _own_processes():
        if proc.pid in found:
            continue
        try:
            if (
                "redis-server" in proc.name()
                and os.getsid(proc.pid) == proc.pid
                and _in_session_dir(proc.cwd(), "redis", root)
            ):
                found[proc.pid] = proc
        except (psutil.Error, OSError):
            continue
    return list(found.values())


def _helper_processes(record: dict[str, Any] | None) -> list[psutil.Process]:
    """The dashboards and metrics exporters the nodes recorded here run (same pid and start
    time as recorded: a reused pid is left alone)."""
    found = []
    for entry in (record or {}).get("nodes", []):
        for name in ("dashboard", "metrics"):
            pid = entry.get(f"{name}_pid")
            if not pid:
                continue
            try:
                proc = psutil.Process(pid)
                if _same_process(proc, entry.get(f"{name}_started")):
                    found.append(proc)
            except psutil.Error:
                continue
    return found


def _descendants(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Every process under the raylets (zygote, workers, embedded redis-server)."""
    result = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            result.extend(proc.children(recursive=True))
    return result


def _gone(proc: psutil.Process) -> bool:
    """Exited (a zombie waiting for its reaper counts as exited)."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait up to timeout for procs to exit; returns those still running."""
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if not _gone(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.01)
        alive = [p for p in alive if not _gone(p)]
    return alive


def _terminate(procs: list[psutil.Process], force: bool, grace: float) -> list[psutil.Process]:
    """SIGTERM (or SIGKILL with force) the raylets; SIGKILL whatever outlives the grace.

    Returns the processes still alive at the end (normally none).
    """
    children = _descendants(procs)
    sig = signal.SIGKILL if force else signal.SIGTERM
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)
    alive = _wait_gone(procs, 0 if force else grace)
    for proc in alive + [p for p in children if not _gone(p)]:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return _wait_gone(procs + children, 5)


# -- status ------------------------------------------------------------------------------
def _format_bytes(amount: float) -> str:
    """Bytes as Ray prints them: 0B, 512.00KiB, 14.65GiB."""
    if amount < 1024:
        return f"{amount:.0f}B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        amount /= 1024
        if amount < 1024 or unit == "TiB":
            return f"{amount:.2f}{unit}"
    raise AssertionError("unreachable")


def _format_amount(name: str, used: float, total: float) -> str:
    if name == "memory" or name == "object_store_memory":
        return f" {_format_bytes(used)}/{_format_bytes(total)} {name}"
    return f" {used:.1f}/{total:.1f} {name}"


def _usage(nodes: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """{resource: (used, total)} summed over live nodes; node:* markers left out."""
    usage: dict[str, tuple[float, float]] = {}
    for info in nodes:
        if not info["alive"]:
            continue
        available = info.get("available") or {}
        for name, total in (info.get("resources") or {}).items():
            if name.startswith("node:"):
                continue
            used = max(0.0, total - available.get(name, total))
            prev_used, prev_total = usage.get(name, (0.0, 0.0))
            usage[name] = (prev_used + used, prev_total + total)
        load = info.get("load") or {}
        store_total = load.get("store_capacity", info.get("object_store_memory") or 0)
        prev_used, prev_total = usage.get("object_store_memory", (0.0, 0.0))
        usage["object_store_memory"] = (
            prev_used + load.get("store_used", 0),
            prev_total + store_total,
        )
    return usage


def _status_lines(nodes: list[dict[str, Any]], url: str, cluster: str) -> list[str]:
    """`ray status`-like report of the node table."""
    alive = [n for n in nodes if n["alive"]]
    lines = [
        f"======== Cluster status: {cluster!r} at {_redact(url)} ========",
        "Node status",
        "-" * 60,
        f"Nodes: {len(alive)} alive, {len(nodes) - len(alive)} dead",
    ]
    for info in sorted(nodes, key=lambda n: (not n["alive"], not n.get("is_head"))):
        host, port = info.get("raylet_address", ("?", 0))
        state = "ALIVE" if info["alive"] else "DEAD"
        head = " (head)" if info.get("is_head") else ""
        lines.append(f" {info['node_id']}  {host}:{port}  {state}{head}")
    lines += ["", "Resources", "-" * 60, "Usage:"]
    usage = _usage(nodes)
    order = sorted(usage, key=lambda n: (n not in ("CPU", "GPU"), n != "CPU", n))
    lines += [_format_amount(name, *usage[name]) for name in order] or [" (no live nodes)"]
    lines += ["", "Object store (per live node):"]
    for info in alive:
        load = info.get("load") or {}
        capacity = load.get("store_capacity", info.get("object_store_memory") or 0)
        used = load.get("store_used")
        used_text = _format_bytes(used) if used is not None else "?"
        spilled = _format_bytes(load.get("spilled_bytes", 0))
        lines.append(
            f" {info['node_id'][:12]}  {used_text}/{_format_bytes(capacity)} used, "
            f"{spilled} spilled"
        )
    if not alive:
        lines.append(" (no live nodes)")
    return lines


# -- commands ----------------------------------------------------------------------------
_node_options = [
    click.option(
        "--num-cpus", type=click.IntRange(min=0), default=None, help="CPUs (default: all)."
    ),
    click.option("--num-gpus", type=click.IntRange(min=0), default=None, help="GPUs (default 0)."),
    click.option(
        "--resources", default=None, metavar="JSON", help="Custom resources: '{\"name\": 2}'."
    ),
    click.option(
        "--memory",
        type=click.IntRange(min=0),
        default=None,
        metavar="BYTES",
        help="Memory available to tasks (default: 70% of what is free).",
    ),
    click.option(
        "--object-store-memory",
        type=click.IntRange(min=MIN_OBJECT_STORE_MEMORY),
        default=None,
        metavar="BYTES",
        help="Shared-memory object store size (default: 30% of memory).",
    ),
    click.option(
        "--node-ip-address",
        default="127.0.0.1",
        show_default=True,
        help="Address this node listens on and announces: one other machines can reach "
        "(not 0.0.0.0).",
    ),
    click.option(
        "--cluster",
        default=DEFAULT_CLUSTER,
        show_default=True,
        help="Cluster name: its keys' prefix, so several clusters can share one Redis.",
    ),
    click.option(
        "--temp-dir",
        default=None,
        metavar="DIR",
        help=f"Where the node's session directory (logs, spilled objects) goes "
        f"(default: {node.ROOT_DIR}).",
    ),
]


def node_options(func: Any) -> Any:
    """The resource and address options shared by `start` and `node`."""
    for option in reversed(_node_options):
        func = option(func)
    return func


class LazyGroup(click.Group):
    """The `redray` group: the node commands are defined here; the commands of redray's
    capabilities (jobs, queues, state, dashboard) are imported only when run, so `redray
    --help` and `redray start` do not pay for importing them all."""

    # name -> ("module:attribute", short help for `redray --help`)
    LAZY = {
        "job": ("redray.jobs.cli:job_cli", "Submit, follow and stop jobs on a redray cluster."),
        "queue": ("redray.durable.cli:queue_cli", "Inspect and operate durable queues."),
        "worker": (
            "redray.celery.cli:worker_command",
            "Run consumers of a Celery app's queues on the cluster until interrupted.",
        ),
        "list": ("redray.state.cli:list_command", "List the cluster's tasks, actors, objects..."),
        "get": ("redray.state.cli:get_command", "Show one RESOURCE by its ID, with every field."),
        "summary": (
            "redray.state.cli:summary_command",
            "Counts of the cluster's tasks, actors or objects, by name and state.",
        ),
        "logs": ("redray.state.cli:logs_command", "A node's log files, or a worker's output."),
        "timeline": ("redray.state.cli:timeline_command", "The tasks as Chrome trace JSON."),
        "dashboard-token": (
            "redray.dashboard.token_cli:dashboard_token",
            "Print the cluster token a dashboard bound beyond loopback asks for.",
        ),
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.LAZY})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.LAZY and name not in self.commands:
            module, _, attribute = self.LAZY[name][0].partition(":")
            self.add_command(getattr(importlib.import_module(module), attribute), name)
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [
            (
                name,
                self.LAZY[name][1]
                if name in self.LAZY
                else self.commands[name].get_short_help_str(),
            )
            for name in self.list_commands(ctx)
            if name in self.LAZY or not self.commands[name].hidden
        ]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="redray", prog_name="redray")
def cli() -> None:
    """redray: Ray's core API on a Redis control plane."""


@cli.command()
@click.option("--head", is_flag=True, help="Start the head node (Redis + GCS + raylet).")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=6379,
    show_default=True,
    help="Port of the embedded Redis (0: a free port).",
)
@click.option(
    "--redis",
    "redis_url",
    default=None,
    metavar="URL",
    help="Use this Redis instead of starting one: redis://[:PASSWORD@]HOST:PORT, or "
    "redis+sentinel://[:PASSWORD@]HOST:PORT[,...]/SERVICE for one run under Sentinel (HA).",
)
@node_options
@dashboard_cli.add_dashboard_options
@dashboard_cli.metrics_option
def start(
    head: bool,
    port: int,
    redis_url: str | None,
    num_cpus: int | None,
    num_gpus: int | None,
    resources: str | None,
    memory: int | None,
    object_store_memory: int | None,
    node_ip_address: str,
    cluster: str,
    temp_dir: str | None,
    include_dashboard: bool | None,
    dashboard_host: str | None,
    dashboard_port: int | None,
    metrics_export_port: int | None,
) -> None:
    """Start a head node that outlives this command, and print how to connect to it."""
    if not head:
        raise click.UsageError(
            "Use `redray start --head` for a head node, or `redray node --redis URL` "
            "to join an existing cluster."
        )
    ctx = click.get_current_context()
    if redis_url and ctx.get_parameter_source("port") == click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError("--port is the embedded Redis's port; it cannot go with --redis.")
    custom = _parse_resources(resources)
    _check_ip(node_ip_address)
    dashboard = dashboard_cli.wanted(include_dashboard, dashboard_host, dashboard_port)
    if dashboard or metrics_export_port is not None:
        dashboard_cli.require_extra()
    new_token = token = secrets.token_bytes(32)
    password = None
    if redis_url:
        gcs = _connect_gcs(redis_url, cluster)
        try:
            # Reuse the token of a cluster already in this Redis: this head is its standby.
            token = gcs.init_cluster(new_token, {"created_by": "redray start"})
        finally:
            gcs.close()
        redis_url = _normalize_url(redis_url)
    else:
        _check_port_free(node_ip_address, port)
        password = secrets.token_hex(16)
    started = _start(
        head=True,
        token=token,
        cluster=cluster,
        resources=node.default_resources(
            num_cpus, num_gpus, custom, node_ip_address, head=True, memory=memory
        ),
        object_store_memory=object_store_memory or node.default_object_store_memory(),
        node_ip_address=node_ip_address,
        gcs_url=redis_url,
        redis_port=port,
        redis_password=password,
        temp_dir=temp_dir,
    )
    gcs_url = started.info["gcs_url"]
    helpers = _start_helpers(
        started,
        gcs_url,
        cluster,
        dashboard,
        dashboard_host,
        dashboard_port,
        metrics_export_port,
    )
    _record_node(started, gcs_url, cluster, head=True, extra=helpers)
    _print_started_head(started, gcs_url, cluster, standby=token != new_token)
    _print_helpers(helpers, token)


def _start_helpers(
    started: node.StartedNode,
    gcs_url: str,
    cluster: str,
    dashboard: bool,
    dashboard_host: str | None,
    dashboard_port: int | None,
    metrics_export_port: int | None,
) -> dict[str, Any]:
    """The dashboard and the metrics exporter asked for a node just started (which is
    stopped again if one of them cannot start)."""
    helpers: dict[str, Any] = {}
    try:
        if dashboard:
            helpers["dashboard"] = dashboard_cli.start_detached(
                gcs_url, cluster, started.session_dir, host=dashboard_host, port=dashboard_port
            )
        if metrics_export_port is not None:
            helpers["metrics"] = dashboard_cli.start_detached(
                gcs_url,
                cluster,
                started.session_dir,
                host=started.info["node_ip_address"],
                port=metrics_export_port,
                node_id=started.info["node_id"],
            )
    except BaseException:
        for helper in helpers.values():
            helper.stop()
        started.stop()
        if started.redis is not None:
            started.redis.stop()
        raise
    return helpers


def _print_helpers(helpers: dict[str, Any], token: bytes) -> None:
    dashboard = helpers.get("dashboard")
    if dashboard is not None:
        click.echo(
            f"\nDashboard: {dashboard.url} (pid {dashboard.pid}); Prometheus: {dashboard.url}/metrics"
        )
        if not dashboard_cli.dashboard_launch.is_loopback(dashboard.host):
            click.echo(
                "  It listens beyond this machine, so it asks for the cluster token:\n"
                f"    {token.hex()}\n"
                "  (sign in with it, or send `Authorization: Bearer <token>`; keep it secret)"
            )
    exporter = helpers.get("metrics")
    if exporter is not None:
        click.echo(f"This node's metrics: {exporter.url}/metrics (pid {exporter.pid})")


def _print_started_head(
    started: node.StartedNode, gcs_url: str, cluster: str, standby: bool
) -> None:
    info = started.info
    host, port = info["raylet_address"]
    cluster_flag = f" --cluster {cluster}" if cluster != DEFAULT_CLUSTER else ""
    lines = [
        f"Local node IP: {info['node_ip_address']}",
        "-" * 20,
        "redray runtime started"
        + (f" (a standby head of cluster {cluster!r}, already in that Redis)." if standby else "."),
        "-" * 20,
        f"Node {info['node_id']} (head), raylet at {host}:{port}, pid {info['pid']}",
        f"Logs: {os.path.join(started.session_dir, 'logs')}",
    ]
    if started.redis is not None:
        lines.append(
            f"Redis: pid {started.redis.pid}, its own process (it outlives the raylet), "
            f"append-only file in {started.redis.directory}"
        )
    lines += [
        "",
        "Cluster address (Redis, holds the password):",
        f"    {gcs_url}",
        "",
        "To connect to this cluster from Python on this machine:",
        "    import redray",
        '    redray.init(address="auto")',
    ]
    if cluster == DEFAULT_CLUSTER:
        lines += ["  or from anywhere that reaches Redis:", f'    redray.init(address="{gcs_url}")']
    lines += [
        "",
        "To add another machine to this cluster, run there:",
        f"    redray node --redis '{gcs_url}'{cluster_flag}",
    ]
    if info["node_ip_address"] in ("127.0.0.1", "::1"):
        lines.append(
            "  (this node listens on 127.0.0.1 only: start it with "
            "--node-ip-address <this machine's IP> to accept other machines)"
        )
    lines += [
        "",
        "To see the cluster's nodes and resources:",
        "    redray status",
        "To stop the redray processes of this machine:",
        "    redray stop",
    ]
    click.echo("\n".join(lines))


@cli.command("node")
@click.option(
    "--redis",
    "redis_url",
    required=True,
    metavar="URL",
    help="The cluster's Redis, as `redray start --head` printed it.",
)
@node_options
@dashboard_cli.metrics_option
def node_command(
    redis_url: str,
    num_cpus: int | None,
    num_gpus: int | None,
    resources: str | None,
    memory: int | None,
    object_store_memory: int | None,
    node_ip_address: str,
    cluster: str,
    temp_dir: str | None,
    metrics_export_port: int | None,
) -> None:
    """Join this machine to the cluster whose Redis is at URL, as a node that outlives us."""
    custom = _parse_resources(resources)
    _check_ip(node_ip_address)
    if metrics_export_port is not None:
        dashboard_cli.require_extra()
    redis_url = _normalize_url(redis_url)
    gcs = _connect_gcs(redis_url, cluster)
    try:
        token = gcs.cluster_token()
    finally:
        gcs.close()
    if token is None:
        raise click.ClickException(
            f"No redray cluster {cluster!r} in Redis at {_redact(redis_url)}: start one there "
            "with `redray start --head`, or pass the right --cluster."
        )
    started = _start(
        head=False,
        token=token,
        cluster=cluster,
        resources=node.default_resources(
            num_cpus, num_gpus, custom, node_ip_address, head=False, memory=memory
        ),
        object_store_memory=object_store_memory or node.default_object_store_memory(),
        node_ip_address=node_ip_address,
        gcs_url=redis_url,
        temp_dir=temp_dir,
    )
    helpers = _start_helpers(started, redis_url, cluster, False, None, None, metrics_export_port)
    _record_node(started, redis_url, cluster, head=False, extra=helpers)
    info = started.info
    host, port = info["raylet_address"]
    click.echo(
        f"Node {info['node_id']} joined cluster {cluster!r} at {_redact(redis_url)}: "
        f"raylet at {host}:{port}, pid {info['pid']}.\n"
        f"Logs: {os.path.join(started.session_dir, 'logs')}\n"
        "Stop it with `redray stop`."
    )
    _print_helpers(helpers, token)


@cli.command()
@click.option("--force", "-f", is_flag=True, help="SIGKILL at once instead of SIGTERM.")
@click.option(
    "--grace-period",
    "-g",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    help="Seconds to wait after SIGTERM before SIGKILL.",
)
@click.option(
    "--temp-dir",
    default=None,
    metavar="DIR",
    help="The temp root whose detached nodes to stop, besides those recorded in the "
    f"current-cluster file (default: {node.ROOT_DIR}).",
)
def stop(force: bool, grace_period: float, temp_dir: str | None) -> None:
    """Stop the redray nodes recorded in the current-cluster file, and the detached nodes of
    this user whose session directories are in the temp root (--temp-dir, else the one under
    TMPDIR), then the Redis `redray start --head` runs; forget the current cluster."""
    with _cluster_file_lock():
        record = _read_record()
        root = node.root_dir(temp_dir)
        procs = _node_processes(record, root)
        servers = _redis_processes(record, root)
        helpers = _helper_processes(record)
        pids = sorted(p.pid for p in procs)
        alive = _terminate(helpers, force, grace_period) if helpers else []
        alive += _terminate(procs, force, grace_period) if procs else []
        # Redis last: the nodes record their end in it as they stop.
        alive += _terminate(servers, force, grace_period) if servers else []
        node.clear_current_cluster()
    if not pids and not servers:
        click.echo("No redray node was running on this machine.")
        return
    how = "Killed" if force else "Stopped"
    if pids:
        click.echo(f"{how} {len(pids)} redray node(s): pid {', '.join(map(str, pids))}.")
    if servers:
        click.echo(f"{how} the cluster's Redis: pid {', '.join(str(p.pid) for p in servers)}.")
    if alive:
        raise click.ClickException(
            "Still running after SIGKILL: pid " + ", ".join(str(p.pid) for p in alive)
        )


@cli.command()
@click.option(
    "--address",
    default="auto",
    show_default=True,
    metavar="URL",
    help='The cluster\'s Redis URL, or "auto" for the one `redray start` runs here.',
)
@click.option(
    "--cluster", default=None, help="Cluster name (default: the recorded one, else 'default')."
)
def status(address: str, cluster: str | None) -> None:
    """Show the cluster's nodes and its resources used/total, read from the GCS."""
    if address == "auto":
        with _temp_root_errors():
            record = node.read_current_cluster()
        if record is None:
            raise click.ClickException(
                "No running redray cluster found on this machine: start one with "
                "`redray start --head`, or pass --address redis://HOST:PORT."
            )
        address = record["gcs_url"]
        cluster = cluster or record.get("cluster", DEFAULT_CLUSTER)
    cluster = cluster or DEFAULT_CLUSTER
    gcs = _connect_gcs(address, cluster, "--address")
    try:
        if gcs.cluster_token() is None:
            raise click.ClickException(
                f"No redray cluster {cluster!r} in Redis at {_redact(gcs.url)}."
            )
        nodes = gcs.nodes()
    except redis.RedisError as exc:
        raise click.ClickException(f"Reading the cluster tables failed: {exc}") from None
    finally:
        gcs.close()
    click.echo("\n".join(_status_lines(nodes, gcs.url, cluster)))


def main() -> None:
    """Console-script entry point (`redray`)."""
    cli(prog_name="redray")


if __name__ == "__main__":
    main()
