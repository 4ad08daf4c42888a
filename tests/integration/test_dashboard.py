"""pmaster --dashboard, end to end: a real pmaster and pworkers, a real headless Chromium.

The browser is Debian's chromium package (.ci/run installs it), driven by Playwright, which
never downloads a browser of its own here. With POOLFLEET_SCREENSHOTS=DIR set, the browser
test saves its screenshots in DIR (docs/img/ holds the ones the README shows).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pfharness import BIN, TASKMODS, Cluster, daemon_env, unavailable, wait_for

from poolfleet.client import Client
from poolfleet.master.settings import MasterSettings

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SHOTS = os.environ.get("POOLFLEET_SCREENSHOTS")
#: Milliseconds the browser waits for a condition on the page (the machine may be loaded).
WAIT_MS = 30_000


def dashboard_url(cluster: Cluster) -> str:
    assert cluster.master is not None
    url: str = cluster.master.wait_event("dashboard_started")["url"]
    return url


def http(
    url: str,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    tls: ssl.SSLContext | None = None,
) -> tuple[int, Any]:
    """(status, decoded JSON) of a GET, or of a POST when ``body`` is given."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=dict(headers or {}))
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=20, context=tls) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        unavailable(f"{CHROMIUM} is missing (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def shot(page: Any, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / name), full_page=True)


@pytest.mark.timeout(300)
def test_dashboard_in_a_browser(make_cluster: type[Cluster], browser: Any) -> None:
    from playwright.sync_api import expect

    cluster = make_cluster()
    cluster.start_master("--dashboard", "127.0.0.1:0")
    url = dashboard_url(cluster)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url)
    expect(page.locator("#no-workers")).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#link")).to_have_text("live", timeout=WAIT_MS)

    # a worker starts: it appears with its slots
    cluster.start_worker("--queue", "default", "--queue", "later", name="wa", cpu=2, io=2)
    row = page.locator('#workers tr[data-worker="wa"]')
    expect(row).to_be_visible(timeout=WAIT_MS)
    expect(row).to_contain_text("cpu 0/2 busy")

    with Client(cluster.client_endpoint) as c:
        # tasks are submitted and finish: the counts follow
        for f in [c.submit("pf_testtasks:add", i, 1) for i in range(5)]:
            f.result(60)
        expect(page.locator("#count-SUCCEEDED .n")).to_have_text("5", timeout=WAIT_MS)
        for f in [c.submit("pf_testtasks:square", i) for i in range(7)]:
            f.result(60)
        expect(page.locator("#count-SUCCEEDED .n")).to_have_text("12", timeout=WAIT_MS)
        # the worker serves queue "later", so it is listed: pause it from the page; a task
        # submitted to it waits, its depth shows; and the charts have samples by now
        later = page.locator('#queues tr[data-queue="later"]')
        later.locator("button.queue-action").click()
        wait_for(lambda: "later" in c.status()["paused"], what="the queue paused on the master")
        c.with_options(queue="later").submit("pf_testtasks:add", 1, 1).ack.result(30)  # type: ignore[union-attr]
        expect(later).to_contain_text("paused", timeout=WAIT_MS)
        expect(later.locator("[data-pending]")).to_have_text("1", timeout=WAIT_MS)
        expect(page.locator("#chart-rate .uplot")).to_be_visible(timeout=WAIT_MS)
        # two io tasks run: the worker's io slots show busy, the RUNNING count follows
        sleepers = [c.submit("pf_testtasks:io_sleep", 600) for _ in range(2)]
        expect(row).to_contain_text("io 2/2 busy", timeout=WAIT_MS)
        expect(page.locator("#count-RUNNING .n")).to_have_text("2", timeout=WAIT_MS)
        shot(page, "dashboard-overview.png")
        c.cancel([f.task_id for f in sleepers])
        expect(row).to_contain_text("io 0/2 busy", timeout=WAIT_MS)

        # resume the queue from the page: the master dispatches it
        later.locator("button.queue-action").click()
        wait_for(lambda: "later" not in c.status()["paused"], what="the queue resumed on the master")
        expect(page.locator("#count-SUCCEEDED .n")).to_have_text("13", timeout=WAIT_MS)

        # a failed task: found in the list by its state, its traceback on its page
        failed = c.submit("pf_testtasks:boom", "the dashboard should show this")
        with pytest.raises(Exception, match="the dashboard should show this"):
            failed.result(60)
        page.goto(url + "#/tasks")
        expect(page.locator(f'#tasks tr[data-task="{failed.task_id}"]')).to_contain_text(
            "FAILED", timeout=WAIT_MS
        )
        shot(page, "dashboard-tasks.png")
        page.goto(url + "#/tasks?state=FAILED")
        expect(page.locator("#tasks tr[data-task]")).to_have_count(1, timeout=WAIT_MS)
        link = page.locator(f'#tasks tr[data-task="{failed.task_id}"] a')
        expect(link).to_be_visible(timeout=WAIT_MS)
        link.click()
        expect(page.locator("#task-state")).to_have_text("FAILED", timeout=WAIT_MS)
        expect(page.locator("#error")).to_contain_text("ValueError: the dashboard should show this")
        tb = page.locator("#traceback")
        expect(tb).to_contain_text("Traceback (most recent call last)")
        expect(tb).to_contain_text("in boom")
        expect(page.locator("#args")).to_contain_text("the dashboard should show this")
        expect(page.locator("#attempts")).to_contain_text("wa")
        shot(page, "dashboard-failed-task.png")
        # retry it from its page: a new task, and the page moves to it
        page.locator("#retry").click()
        expect(page.locator("#task-id")).not_to_have_text(failed.task_id, timeout=WAIT_MS)
        new_id = page.locator("#task-id").inner_text()
        expect(page.locator("#task-state")).to_have_text("FAILED", timeout=WAIT_MS)  # it fails again
        shown = c.show(new_id)
        assert shown is not None and shown["name"] == "pf_testtasks:boom" and shown["state"] == "FAILED"

        # a running task is cancelled from its page: CANCELLED on the master
        running = c.submit("pf_testtasks:spin_for", 600)
        wait_for(lambda: c.show(running.task_id)["state"] == "RUNNING", what="the spinning task to run")  # type: ignore[index]
        page.goto(url + "#/task/" + running.task_id)
        expect(page.locator("#task-state")).to_have_text("RUNNING", timeout=WAIT_MS)
        page.locator("#cancel").click()
        expect(page.locator("#task-state")).to_have_text("CANCELLED", timeout=WAIT_MS)
        wait_for(
            lambda: (c.show(running.task_id) or {}).get("state") == "CANCELLED",
            what="CANCELLED on the master",
        )
        expect(page.locator("#error")).to_contain_text("Cancelled")
        shot(page, "dashboard-cancelled-task.png")
    assert errors == [], errors


def test_token_guards_the_api_and_the_login_sets_a_cookie(
    make_cluster: type[Cluster], tmp_path: Path, browser: Any
) -> None:
    from playwright.sync_api import expect

    token = "s3cret-token-of-the-dashboard-0123"
    token_file = tmp_path / "dashboard.token"
    token_file.write_text(token + "\n")
    cluster = make_cluster()
    cluster.start_master("--dashboard", "127.0.0.1:0", "--dashboard-token-file", str(token_file))
    url = dashboard_url(cluster)
    assert http(url + "api/overview")[0] == 401
    assert http(url + "api/overview", headers={"Authorization": "Bearer wrong-token-wrong-token"})[0] == 401
    status, doc = http(url + "api/overview", headers={"Authorization": f"Bearer {token}"})
    assert status == 200 and doc["workers"] == []
    assert http(url + "login", {"token": "nope"})[0] == 403
    # a change is a JSON POST: a form post from elsewhere is refused before anything happens
    req = urllib.request.Request(url + "api/queues/default/pause", data=b"x=1", method="POST")
    req.add_header("Authorization", f"Bearer {token}")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=20)
    assert err.value.code == 415
    with Client(cluster.client_endpoint) as c:
        assert c.status()["paused"] == []

    page = browser.new_page()
    page.goto(url)
    page.locator("#token").fill("not the token at all")
    page.locator("form.login button").click()
    expect(page.locator("#toast")).to_have_text("wrong token", timeout=WAIT_MS)
    page.locator("#token").fill(token)
    page.locator("form.login button").click()
    expect(page.locator("#no-workers")).to_be_visible(timeout=WAIT_MS)
    cookies = {c["name"]: c for c in page.context.cookies()}
    assert cookies["poolfleet_dashboard"]["httpOnly"] is True
    assert token not in cookies["poolfleet_dashboard"]["value"]


def test_without_a_token_only_loopback_host_names_are_answered(make_cluster: type[Cluster]) -> None:
    cluster = make_cluster()
    cluster.start_master("--dashboard", "127.0.0.1:0")
    url = dashboard_url(cluster)
    assert http(url + "api/info")[0] == 200
    # a page elsewhere reaching the dashboard through DNS rebinding sends its own host name
    status, doc = http(url + "api/info", headers={"Host": "attacker.example"})
    assert status == 421 and "loopback" in doc["error"]
    status, doc = http(url + "api/tasks?state=NOPE")
    assert status == 400 and "unknown state 'NOPE'" in doc["error"]
    status, doc = http(url + "api/tasks/0190f1b2-3c4d-7e5f-8a6b-7c8d9e0fa1b2")
    assert status == 404 and "unknown task id" in doc["error"]
    status, doc = http(url + "api/tasks?since=yesterday")
    assert status == 400 and "since takes a duration" in doc["error"]
    # what this version's client offers beyond the base requests, for the page to show
    status, doc = http(url + "api/info")
    assert status == 200 and doc["can"]["task_output"] == hasattr(Client, "logs")
    status, doc = http(url + "api/tasks/0190f1b2-3c4d-7e5f-8a6b-7c8d9e0fa1b2/logs")
    assert status == (404 if hasattr(Client, "logs") else 501), doc
    assert cluster.master is not None and cluster.master.alive()
    # SIGTERM stops the dashboard with the master: exit 0, nothing left listening
    cluster.master.signal(signal.SIGTERM)
    assert cluster.master.wait(30) == 0
    cluster.master.wait_event("master_stopped")
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url + "api/info", timeout=20)


def run_pmaster(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "pmaster"), "--data-dir", str(tmp_path / "data"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=daemon_env(),
        stdin=subprocess.DEVNULL,
    )


def test_off_loopback_dashboard_needs_a_token_or_tls(tmp_path: Path) -> None:
    r = run_pmaster(tmp_path, "--dashboard", "0.0.0.0:0")
    assert r.returncode == 2
    assert "refusing to serve the dashboard on 0.0.0.0:0" in r.stderr and "--dashboard-token-file" in r.stderr
    short = tmp_path / "short.token"
    short.write_text("abc")
    r = run_pmaster(tmp_path, "--dashboard", "0.0.0.0:0", "--dashboard-token-file", str(short))
    assert r.returncode == 2 and re.search(r"at least 16 characters", r.stderr), r.stderr
    r = run_pmaster(tmp_path, "--dashboard", "localhost:99999")
    assert r.returncode == 2 and "malformed dashboard address" in r.stderr
    r = run_pmaster(tmp_path, "--dashboard", "127.0.0.1:0", "--dashboard-tls-cert", str(short))
    assert r.returncode == 2 and "dashboard_tls_key" in r.stderr


@pytest.mark.skipif(
    not hasattr(Client, "logs") or not (TASKMODS / "pf_outtasks.py").exists(),
    reason="this version keeps no task output or progress (Client.logs, pf_outtasks)",
)
def test_task_page_follows_output_and_progress(
    make_cluster: type[Cluster], tmp_path: Path, browser: Any
) -> None:
    from playwright.sync_api import expect

    cluster = make_cluster()
    cluster.start_master("--dashboard", "127.0.0.1:0")
    cluster.start_worker(name="wo", tasks=("pf_outtasks",))
    url = dashboard_url(cluster)
    gate = tmp_path / "gate"
    page = browser.new_page()
    with Client(cluster.client_endpoint) as c:
        fut = c.submit("pf_outtasks:gated", str(gate))
        page.goto(url + "#/task/" + fut.task_id)
        expect(page.locator("#progress")).to_contain_text("waiting at the gate", timeout=WAIT_MS)
        expect(page.locator("#progress")).to_contain_text("50%")
        expect(page.locator("#logs")).to_contain_text("before the gate", timeout=WAIT_MS)
        gate.touch()
        assert fut.result(60) == "done"
        expect(page.locator("#task-state")).to_have_text("SUCCEEDED", timeout=WAIT_MS)
        expect(page.locator("#logs")).to_contain_text("after the gate", timeout=WAIT_MS)
        expect(page.locator("#progress")).to_contain_text("through")


def test_dashboard_with_curve_keys_uses_its_own_client_key(
    make_cluster: type[Cluster], tmp_path: Path
) -> None:
    made, allowed_workers, allowed_clients = tmp_path / "made", tmp_path / "workers", tmp_path / "clients"
    for name in ("master", "worker", "dashboard", "stranger"):
        r = subprocess.run(
            [str(BIN / "ptask"), "keys", "generate", str(made), "--name", name],
            capture_output=True,
            text=True,
            timeout=60,
            env=daemon_env(),
        )
        assert r.returncode == 0, r.stderr
    allowed_workers.mkdir()
    allowed_clients.mkdir()
    shutil.copy(made / "worker.key", allowed_workers)
    shutil.copy(made / "dashboard.key", allowed_clients)
    admins = tmp_path / "admins"  # the dashboard steers: its key is an admin key too
    admins.mkdir()
    shutil.copy(made / "dashboard.key", admins)
    curve = ["--curve-secret-key", str(made / "master.key_secret")]
    curve += ["--curve-workers-dir", str(allowed_workers), "--curve-clients-dir", str(allowed_clients)]
    curve += ["--curve-admin-dir", str(admins)]
    # the dashboard is a client like any other: with keys on it needs a client key of its own
    r = run_pmaster(tmp_path, *curve, "--dashboard", "127.0.0.1:0")
    assert r.returncode == 2 and "dashboard_curve_secret_key" in r.stderr, r.stderr
    cluster = make_cluster()
    cluster.start_master(
        *curve,
        "--dashboard",
        "127.0.0.1:0",
        "--dashboard-curve-secret-key",
        str(made / "dashboard.key_secret"),
    )
    cluster.start_worker(
        "--curve-server-key",
        str(made / "master.key"),
        "--curve-secret-key",
        str(made / "worker.key_secret"),
        name="wk",
    )
    url = dashboard_url(cluster)
    status, doc = wait_for(
        lambda: (lambda r: r if r[0] == 200 and r[1]["workers"] else None)(http(url + "api/overview"))
    )
    assert [w["worker_id"] for w in doc["workers"]] == ["wk"]
    status, doc = http(url + "api/queues/default/pause", {})
    assert status == 200 and doc["paused"] is True
    assert cluster.master is not None and not cluster.master.events("peer_refused")


def test_dashboard_over_tls(make_cluster: type[Cluster], tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        unavailable("the openssl command is missing (apt-get install openssl)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    r = subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    token_file = tmp_path / "token"
    token_file.write_text("a-token-for-the-tls-dashboard-42")
    tls = ["--dashboard-tls-cert", str(cert), "--dashboard-tls-key", str(key)]
    cluster = make_cluster()
    cluster.start_master("--dashboard", "127.0.0.1:0", *tls, "--dashboard-token-file", str(token_file))
    url = dashboard_url(cluster)
    assert url.startswith("https://127.0.0.1:")
    ctx = ssl.create_default_context(cafile=str(cert))
    assert http(url + "api/overview", tls=ctx)[0] == 401
    bearer = {"Authorization": "Bearer a-token-for-the-tls-dashboard-42"}
    status, doc = http(url + "api/overview", headers=bearer, tls=ctx)
    assert status == 200 and doc["workers"] == []
    req = urllib.request.Request(
        url + "login",
        data=json.dumps({"token": "a-token-for-the-tls-dashboard-42"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=20, context=ctx) as resp:
        cookie = resp.headers["Set-Cookie"]
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen("http" + url[len("https") :] + "api/info", timeout=20)
    assert cluster.master is not None and cluster.master.alive()


@pytest.mark.skipif(
    not (hasattr(Client, "purge_queue") and hasattr(Client, "control_worker")),
    reason="this version has no queue purge or worker drain (Client.purge_queue, Client.control_worker)",
)
def test_purge_a_queue_and_drain_a_worker_from_the_overview(
    make_cluster: type[Cluster], browser: Any
) -> None:
    from playwright.sync_api import expect

    cluster = make_cluster()
    cluster.start_master("--dashboard", "127.0.0.1:0")
    worker = cluster.start_worker(name="wd")
    url = dashboard_url(cluster)
    page = browser.new_page()
    dialogs: list[str] = []

    def accept(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.accept()

    page.on("dialog", accept)
    with Client(cluster.client_endpoint) as c:
        acks = [c.with_options(queue="nobody").submit("pf_testtasks:add", i, 1).ack for i in range(3)]
        for a in acks:
            a.result(30)  # type: ignore[union-attr]
        page.goto(url)
        row = page.locator('#queues tr[data-queue="nobody"]')
        expect(row.locator("[data-pending]")).to_have_text("3", timeout=WAIT_MS)
        row.locator("button.queue-purge").click()
        expect(page.locator("#toast")).to_contain_text("3 pending tasks cancelled", timeout=WAIT_MS)
        assert dialogs == ["Cancel the 3 pending tasks of queue nobody?"]
        wait_for(lambda: c.status()["counts"].get("CANCELLED") == 3, what="the purged tasks CANCELLED")
        page.locator('#workers tr[data-worker="wd"] button.worker-drain').click()
        assert worker.wait(30) == 0  # it drained and exited, as after a SIGTERM on its host
        expect(page.locator("#no-workers")).to_be_visible(timeout=WAIT_MS)


@pytest.mark.skipif(
    "curve_admin_dir" not in MasterSettings.__dataclass_fields__,
    reason="this version has no admin keys (pmaster --curve-admin-dir)",
)
def test_a_dashboard_without_an_admin_key_can_look_but_not_steer(
    make_cluster: type[Cluster], tmp_path: Path
) -> None:
    made = tmp_path / "made"
    dirs = {name: tmp_path / name for name in ("workers", "clients", "admins")}
    for name in ("master", "dashboard", "admin"):
        r = subprocess.run(
            [str(BIN / "ptask"), "keys", "generate", str(made), "--name", name],
            capture_output=True,
            text=True,
            timeout=60,
            env=daemon_env(),
        )
        assert r.returncode == 0, r.stderr
    for d in dirs.values():
        d.mkdir()
    for name in ("dashboard", "admin"):
        shutil.copy(made / f"{name}.key", dirs["clients"])
    shutil.copy(made / "admin.key", dirs["admins"])
    cluster = make_cluster()
    cluster.start_master(
        "--curve-secret-key",
        str(made / "master.key_secret"),
        "--curve-workers-dir",
        str(dirs["workers"]),
        "--curve-clients-dir",
        str(dirs["clients"]),
        "--curve-admin-dir",
        str(dirs["admins"]),
        "--dashboard",
        "127.0.0.1:0",
        "--dashboard-curve-secret-key",
        str(made / "dashboard.key_secret"),
    )
    url = dashboard_url(cluster)
    status, doc = wait_for(lambda: (lambda r: r if r[0] == 200 else None)(http(url + "api/overview")))
    assert doc["workers"] == []
    status, doc = http(url + "api/queues/default/pause", {})
    assert status == 403, doc
    # the admin key (the dashboard's key moved into the admin directory) may steer
    shutil.copy(made / "dashboard.key", dirs["admins"])
    status, doc = wait_for(
        lambda: (lambda r: r if r[0] == 200 else None)(http(url + "api/queues/default/pause", {}))
    )
    assert doc["paused"] is True


@pytest.mark.skipif(
    not (hasattr(Client, "schedules") and hasattr(Client, "limits")),
    reason="this version keeps no schedules or rate limits (Client.schedules, Client.limits)",
)
def test_schedules_and_limits_on_the_overview(make_cluster: type[Cluster], browser: Any) -> None:
    from playwright.sync_api import expect

    cluster = make_cluster()
    cluster.start_master("--dashboard", "127.0.0.1:0")
    cluster.start_worker(name="ws")
    url = dashboard_url(cluster)
    page = browser.new_page()
    with Client(cluster.client_endpoint) as c:
        c.schedule_add("every-second", "pf_testtasks:add", (1, 2), every_s=1)  # type: ignore[attr-defined]
        c.limit_set("pf_testtasks:square", "5/s")  # type: ignore[attr-defined]
        page.goto(url)
        row = page.locator('#schedules tr[data-schedule="every-second"]')
        expect(row).to_contain_text("every 1", timeout=WAIT_MS)
        expect(row.locator("a")).to_be_visible(timeout=WAIT_MS)  # its last run, linked
        expect(page.locator('#limits tr[data-limit="pf_testtasks:square"]')).to_contain_text("5/s")
        row.locator("button.schedule-action").click()
        expect(row).to_contain_text("paused", timeout=WAIT_MS)
        [sched] = [s for s in c.schedules() if s["name"] == "every-second"]  # type: ignore[attr-defined]
        assert sched["paused"] is True
