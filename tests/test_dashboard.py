"""The dashboard with a real cluster: its JSON API against the state API, the token it asks
for when bound beyond loopback, and its pages in a real headless Chromium (Selenium).

One private cluster with its dashboard serves the module; the browser tests share one
Chromium. In CI (REDRAY_CI, set by `.ci/run`, which installs the browser when run as root) a
missing browser fails the browser tests; elsewhere (a plain `pytest`) they skip, saying why.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, run_driver, wait_for

import redray
from redray.core import context
from redray.dashboard import launch as dashboard_launch
from redray.job_submission import JobStatus, JobSubmissionClient
from redray.node.launch import guess_node_ip
from redray.util import state
from redray.util.placement_group import placement_group, remove_placement_group

pytestmark = pytest.mark.timeout(120)


@redray.remote
class Keeper:
    def __init__(self, label: str):
        self.label = label

    def ping(self) -> str:
        return self.label


@redray.remote
def square(x: int) -> int:
    print(f"square-log-line {x}")
    return x * x


@redray.remote(max_retries=0)
def explode() -> None:
    raise ValueError("dashboard-boom")


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any, dict]:
    """(status, body: JSON when it is, else text, headers) of a GET."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            status, raw, found = response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        status, raw, found = exc.code, exc.read(), dict(exc.headers)
    text = raw.decode()
    if "json" in found.get("Content-Type", ""):
        return status, json.loads(text), found
    return status, text, found


@pytest.fixture(scope="module")
def dash():
    """A private cluster with its dashboard, holding actors (one alive, one dead), tasks
    (finished and failed), a placement group; the dashboard's base URL and what it holds."""
    ctx = redray.init(num_cpus=2, include_dashboard=True, dashboard_port=0)
    try:
        keeper = Keeper.options(name="dash-keeper").remote("kept")
        doomed = Keeper.remote("doomed")
        assert redray.get([keeper.ping.remote(), doomed.ping.remote()]) == ["kept", "doomed"]
        redray.kill(doomed)
        assert redray.get([square.remote(i) for i in range(3)]) == [0, 1, 4]
        with pytest.raises(ValueError):
            redray.get(explode.remote())
        group = placement_group([{"CPU": 0.1}], name="dash-group")
        redray.get(group.ready())
        wait_for(
            lambda: (
                len(state.list_tasks(filters=[("name", "=", "square")])) == 3
                and state.list_tasks(filters=[("state", "=", "FAILED")])
                and state.list_actors(filters=[("state", "=", "DEAD")])
            ),
            timeout=20,
            message="the task events and the dead actor never showed in the state API",
        )
        yield {
            "url": "http://" + ctx.dashboard_url,
            "context": ctx,
            "keeper": keeper,
            "group": group,
        }
        remove_placement_group(group)
    finally:
        redray.shutdown()


def ids(records: list[Any], key: str) -> set[str]:
    return {r[key] for r in records}


# -- the JSON API ---------------------------------------------------------------------------
def test_init_returns_the_dashboard_url(dash):
    url = dash["context"].dashboard_url
    assert url.startswith("127.0.0.1:")  # host:port, as Ray's context gives it
    assert dash["context"]["webui_url"] == url
    status, body, headers = get(dash["url"] + "/")
    assert status == 200 and "redray dashboard" in body


def test_api_answers_what_the_state_api_says(dash):
    base = dash["url"]
    for resource, key, lister in (
        ("nodes", "node_id", state.list_nodes),
        ("jobs", "job_id", state.list_jobs),
        ("actors", "actor_id", state.list_actors),
        ("placement_groups", "placement_group_id", state.list_placement_groups),
    ):
        status, body, _ = get(f"{base}/api/{resource}")
        assert status == 200, body
        assert ids(body["result"], key) == ids(lister(detail=True), key), resource

    status, body, _ = get(base + "/api/actors")
    actors = {a["actor_id"]: a for a in body["result"]}
    for record in state.list_actors(detail=True):
        shown = actors[record.actor_id]
        for field in ("state", "class_name", "pid", "node_id", "num_restarts", "death_cause"):
            assert shown[field] == record[field], field
    dead = [a for a in actors.values() if a["state"] == "DEAD"]
    assert dead and dead[0]["death_cause"]["actor_died_error_context"]["error_message"]

    status, body, _ = get(base + "/api/tasks?name=square")
    expected = state.list_tasks(filters=[("name", "=", "square")], detail=True)
    assert ids(body["result"], "task_id") == ids(expected, "task_id")
    assert all(t["state"] == "FINISHED" and t["end_time_ms"] for t in body["result"])

    status, body, _ = get(base + "/api/tasks?state=FAILED")
    (failed,) = [t for t in body["result"] if t["name"] == "explode"]
    assert failed["error_type"] == "TASK_EXECUTION_EXCEPTION"
    assert 'in explode\n    raise ValueError("dashboard-boom")' in failed["error_message"]
    status, body, _ = get(f"{base}/api/tasks/{failed['task_id']}")
    assert status == 200 and body["result"][0]["error_message"] == failed["error_message"]

    status, body, _ = get(base + "/api/overview")
    assert [n["node_id"] for n in body["nodes"]] == [n.node_id for n in state.list_nodes()]
    (node,) = body["nodes"]
    assert node["resources_total"]["CPU"] == 2.0
    assert body["actors"] == {"ALIVE": 1, "DEAD": 1}
    assert body["placement_groups"] == {"CREATED": 1}

    def by_state() -> dict[str, int]:
        counts: dict[str, int] = {}
        for entry in state.summarize_tasks()["cluster"]["summary"].values():
            for task_state, count in entry["state_counts"].items():
                counts[task_state] = counts.get(task_state, 0) + count
        return counts

    wait_for(lambda: get(base + "/api/overview")[1]["tasks"] == by_state(), timeout=10)
    assert by_state()["FAILED"] == 1

    status, body, _ = get(base + "/api/tasks?limit=0")
    assert status == 400 and "limit" in body["error"]
    status, body, _ = get(base + "/api/no_such_thing")
    assert status == 404


def test_logs_and_timeline(dash):
    base = dash["url"]
    status, body, _ = get(base + "/api/logs")
    assert status == 200
    assert body["result"] == state.list_logs()
    square_task = state.list_tasks(filters=[("name", "=", "square")], detail=True)[0]
    name = next(
        n for n in body["result"]["worker_out"] if n.startswith(f"worker-{square_task.worker_id}")
    )
    query = urllib.parse.urlencode({"filename": name, "tail": 50})
    status, text, _ = get(f"{base}/api/logs/file?{query}")
    assert status == 200 and "square-log-line" in text
    status, body, _ = get(base + "/api/logs/file?filename=../../etc/passwd")
    assert status in (400, 503) and "not a log file name" in body["error"]

    status, body, headers = get(base + "/api/timeline")
    assert status == 200 and "attachment" in headers["Content-Disposition"]
    assert {e["name"] for e in body if e["ph"] == "X"} >= {"square", "explode", "Keeper.ping"}


def test_missing_extra_fails_with_a_clear_message():
    proc = run_driver(
        """
        import sys
        sys.modules["aiohttp"] = None  # as if the dashboard extra were not installed
        import redray
        from redray.dashboard.deps import DashboardDependencyError
        try:
            redray.init(num_cpus=1, include_dashboard=True, dashboard_port=0)
        except DashboardDependencyError as exc:
            print("refused:", exc)
        assert not redray.is_initialized()
        """,
        timeout=60,
    )
    assert "refused: The dashboard needs aiohttp" in proc.stdout
    assert "pip install 'redray[dashboard]'" in proc.stdout


# -- beyond loopback: the token --------------------------------------------------------------
@pytest.fixture(scope="module")
def exposed(dash, tmp_path_factory):
    """A second dashboard of the cluster, bound to this machine's non-loopback address."""
    ip = guess_node_ip()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address to bind the dashboard to")
    worker = context.current
    logs = tmp_path_factory.mktemp("exposed-dashboard")
    process = dashboard_launch.start(
        gcs_url=worker.gcs.url, cluster=worker.gcs.cluster, host=ip, port=0, log_dir=str(logs)
    )
    yield process.url, worker.gcs.cluster_token().hex()
    process.stop()


def post_form(url: str, fields: dict[str, str]) -> tuple[int, str, dict]:
    data = urllib.parse.urlencode(fields).encode()
    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, data=data), timeout=20) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def test_bound_beyond_loopback_it_requires_the_cluster_token(exposed):
    url, token = exposed
    assert not url.startswith("http://127.")
    for path in ("/api/actors", "/api/tasks", "/metrics", "/api/timeline", "/api/logs"):
        status, body, _ = get(url + path)
        assert status == 401, path
        assert "unauthorized" in body["error"]
    status, body, _ = get(url + "/")
    assert status == 401 and 'name="token"' in body  # the login form, nothing else
    status, body, _ = get(url + "/api/actors", {"Authorization": "Bearer " + "0" * len(token)})
    assert status == 401
    status, body, _ = get(url + "/api/actors", {"Authorization": "Bearer " + token})
    assert status == 200 and body["result"]
    status, text, _ = get(url + "/metrics", {"Authorization": "Bearer " + token})
    assert status == 200 and "ray_actors" in text

    status, body, _ = post_form(url + "/login", {"token": "not-it"})
    assert status == 401 and "not this cluster's token" in body
    status, body, headers = post_form(url + "/login", {"token": token})
    assert status == 303
    cookie = headers["Set-Cookie"].split(";")[0]
    assert token not in cookie  # the cookie proves the token without holding it
    status, body, _ = get(url + "/api/actors", {"Cookie": cookie})
    assert status == 200 and body["result"]
    tampered = cookie[:-1] + ("1" if cookie.endswith("0") else "0")  # (one digit changed)
    status, body, _ = get(url + "/api/actors", {"Cookie": tampered})
    assert status == 401


def test_the_job_api_takes_the_dashboards_address(dash):
    """`JobSubmissionClient("http://HOST:8265")`, as with Ray: the dashboard hands the
    cluster's Redis address (it holds the Redis password) only to a caller with the cluster
    token, even on loopback; with it, a job runs and succeeds."""
    status, body, _ = get(dash["url"] + "/api/cluster_address")
    assert status == 401 and "unauthorized" in body["error"]
    with pytest.raises(ConnectionError, match="asks for the cluster token"):
        JobSubmissionClient(dash["url"])
    token = context.current.gcs.cluster_token().hex()
    client = JobSubmissionClient(dash["url"], headers={"Authorization": "Bearer " + token})
    try:
        sid = client.submit_job(entrypoint="echo job-through-the-dashboard")
        wait_for(
            lambda: client.get_job_status(sid).is_terminal(), 60, message="the job never ended"
        )
        assert client.get_job_status(sid) == JobStatus.SUCCEEDED
        assert "job-through-the-dashboard" in client.get_job_logs(sid)
    finally:
        client.close()


# -- the pages in a real browser ---------------------------------------------------------------
def _browser_missing_reason() -> str | None:
    if shutil.which("chromium") and shutil.which("chromedriver"):
        return None
    return "chromium and chromium-driver are not installed"


@pytest.fixture(scope="module")
def browser():
    reason = _browser_missing_reason()
    if reason is not None:
        if os.environ.get("REDRAY_CI"):
            pytest.fail(f"{reason}: apt-get install -y chromium chromium-driver (.ci/run does)")
        pytest.skip(f"{reason} (`bash .ci/run` installs them when run as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,900"):
        options.add_argument(argument)
    options.add_argument("--disable-dev-shm-usage")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def open_page(driver: Any, url: str, shots: Path, name: str, *expected: str) -> str:
    """Load a page, wait until every expected text shows, screenshot it; the page text."""
    driver.get(url)
    wait_for(
        lambda: all(text in driver.find_element("tag name", "main").text for text in expected),
        timeout=20,
        interval=0.1,
        message=f"{name}: never showed {expected}",
    )
    shots.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(shots / f"{name}.png"))
    return driver.find_element("tag name", "main").text


def console_errors(driver: Any) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_every_page_shows_what_the_cluster_holds(dash, browser, tmp_path):
    base = dash["url"]
    shots = tmp_path / "screenshots"
    nodes = state.list_nodes()
    actors = state.list_actors(detail=True)
    jobs = state.list_jobs()
    squares = state.list_tasks(filters=[("name", "=", "square")])
    groups = state.list_placement_groups()
    browser.get_log("browser")  # (start from a clean console)

    open_page(browser, base + "/", shots, "overview", nodes[0].node_id[:12], "ALIVE", "FAILED")
    if os.environ.get("REDRAY_UPDATE_SCREENSHOT"):
        shutil.copy(shots / "overview.png", REPO / "docs" / "dashboard.png")
    text = open_page(browser, base + "/jobs", shots, "jobs", jobs[0].job_id)
    assert "RUNNING" in text
    text = open_page(browser, base + "/actors", shots, "actors", *(a.actor_id[:12] for a in actors))
    assert "dash-keeper" in text and "DEAD" in text
    dead = next(a for a in actors if a.state == "DEAD")
    assert dead.death_cause["actor_died_error_context"]["error_message"][:40] in text
    open_page(browser, base + "/tasks", shots, "tasks", *(t.task_id[:12] for t in squares))
    open_page(
        browser,
        base + "/placement-groups",
        shots,
        "placement-groups",
        groups[0].placement_group_id[:12],
        "dash-group",
        "CREATED",
    )
    open_page(browser, base + "/logs", shots, "logs", "raylet.log")
    browser.find_element("css selector", 'a[data-file="raylet.log"]').click()
    wait_for(
        lambda: browser.find_elements("id", "log-text"), timeout=20, message="no log text shown"
    )
    browser.save_screenshot(str(shots / "logs-raylet.png"))
    assert console_errors(browser) == []
    assert sorted(p.name for p in shots.iterdir()) == [
        "actors.png",
        "jobs.png",
        "logs-raylet.png",
        "logs.png",
        "overview.png",
        "placement-groups.png",
        "tasks.png",
    ]


def test_a_failed_task_shows_its_traceback(dash, browser, tmp_path):
    (failed,) = state.list_tasks(filters=[("name", "=", "explode")])
    browser.get_log("browser")
    open_page(browser, dash["url"] + "/tasks?state=FAILED", tmp_path, "failed", failed.task_id[:12])
    rows = browser.find_elements("css selector", f'#tasks-table tr[data-id="{failed.task_id}"]')
    rows[0].click()
    wait_for(
        lambda: browser.find_elements("css selector", "pre.traceback"),
        timeout=20,
        message="the error never showed",
    )
    traceback = browser.find_element("css selector", "pre.traceback").text
    assert 'in explode\n    raise ValueError("dashboard-boom")' in traceback
    assert "ValueError: dashboard-boom" in traceback
    browser.save_screenshot(str(tmp_path / "traceback.png"))
    assert console_errors(browser) == []


def test_live_refresh_shows_a_new_actor(dash, browser, tmp_path):
    browser.get_log("browser")
    open_page(browser, dash["url"] + "/actors?refresh=300", tmp_path, "before", "dash-keeper")
    newcomer = Keeper.options(name="dash-newcomer").remote("new")
    assert redray.get(newcomer.ping.remote()) == "new"
    wait_for(
        lambda: "dash-newcomer" in browser.find_element("tag name", "main").text,
        timeout=20,
        interval=0.1,
        message="the new actor never appeared without a reload",
    )
    browser.save_screenshot(str(tmp_path / "after.png"))
    assert console_errors(browser) == []
    redray.kill(newcomer)
