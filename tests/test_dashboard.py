"""The dashboard and its data: GET /events snapshots, GET /analytics, and the page itself in a real
headless Chromium (Debian's, driven by Playwright) against a gateway under light load."""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest

from upstreams import HOST, RecordingUpstream, free_port, http_request, wait_for

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# A reference that would make the browser fetch something from another site.
OFF_SITE = re.compile(rb"""(src|href)\s*=\s*["']?(https?:)?//|url\(\s*["']?(https?:)?//|@import|fetch\(\s*["'`]https?:""")


def dashboard_config(up_ports: list[int], token: str | None = None) -> dict:
    admin = {"bind": f"{HOST}:{free_port()}"}
    if token:
        admin["token"] = token
    return {
        "version": 1,
        "listeners": [{"name": "public", "bind": f"{HOST}:{free_port()}"}],
        "admin": admin,
        "services": {"shop": {"targets": [{"address": f"{HOST}:{p}"} for p in up_ports],
                              "balance": {"algorithm": "round_robin"}}},
        "consumers": [{"name": n, "credentials": {"api_keys": ["sha256:" + hashlib.sha256(n.encode()).hexdigest()]}}
                      for n in ("acme", "globex")],
        "routes": [
            {"name": "partners", "match": {"paths": ["/partners/**"]}, "service": "shop",
             "plugins": [{"key_auth": {}}, {"rate_limit": {"limit": 5, "window": "1s", "key": ["consumer"]}}]},
            {"name": "catalog", "match": {"paths": ["/catalog/**"]}, "service": "shop",
             "plugins": [{"cache": {"ttl": "1s"}}]},
            {"name": "all", "service": "shop"},
        ],
    }


class Load:
    """A little steady traffic in a thread: plain, cached, and two consumers (one over its limit)."""

    def __init__(self, port: int):
        self.port, self.stop = port, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        i = 0
        while not self.stop.is_set():
            i += 1
            http_request(self.port, "GET", f"/x/{i % 7}")
            http_request(self.port, "GET", "/catalog/item")
            http_request(self.port, "GET", "/partners/a", headers={"x-api-key": "acme" if i % 3 else "globex"})
            time.sleep(0.02)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def read_events(port: int, n: int, token: str | None = None) -> list[dict]:
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    conn.request("GET", "/events", headers={"Authorization": f"Bearer {token}"} if token else {})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type") == "text/event-stream"
    snapshots = []
    while len(snapshots) < n:
        line = resp.readline()
        if line.startswith(b"data: "):
            snapshots.append(json.loads(line[6:]))
    conn.close()
    return snapshots


def test_events_stream_live_snapshots(gateway, start_upstream):
    ups = [start_upstream(RecordingUpstream()) for _ in range(2)]
    gw = gateway(dashboard_config([u.port for u in ups]))
    with Load(gw.port):
        snaps = read_events(gw.admin_port, 4)
    last = snaps[-1]
    assert [s["ts"] for s in snaps] == sorted(s["ts"] for s in snaps) and snaps[-1]["ts"] - snaps[0]["ts"] >= 2
    assert set(last) >= {"ts", "config_version", "workers", "totals", "routes", "services", "cache", "reload"}
    assert last["totals"]["rps"] > 20 and last["totals"]["p50_ms"] > 0 and last["totals"]["p99_ms"] >= last["totals"]["p50_ms"]
    routes = {r["name"]: r for r in last["routes"]}
    assert routes["all"]["rps"] > 5 and routes["all"]["error_rate"] == 0
    assert routes["partners"]["rate_limited"] > 0                    # 5/s per consumer, acme asks for more
    assert routes["catalog"]["cache_hit_ratio"] > 0.5 and last["cache"]["hit_ratio"] > 0
    [shop] = last["services"]
    shares = [t["share"] for t in shop["targets"]]
    assert len(shares) == 2 and abs(shares[0] - 0.5) < 0.2 and abs(sum(shares) - 1) < 0.01
    assert {"healthy", "ejected", "circuit", "active", "ewma_ms", "weight", "draining"} <= set(shop["targets"][0])
    assert last["workers"][0]["pid"] and last["reload"]["ok"] is True
    assert last["totals"]["requests"] > snaps[0]["totals"]["requests"]


def test_analytics_per_consumer_route_and_service(gateway, start_upstream):
    up = start_upstream(RecordingUpstream())
    gw = gateway(dashboard_config([up.port]))
    for i in range(12):
        http_request(gw.port, "GET", "/partners/a", headers={"x-api-key": "acme"})
        time.sleep(0.21)                                                 # under 5/s: all admitted
    for _ in range(3):
        http_request(gw.port, "GET", "/partners/b", headers={"x-api-key": "globex"})
    http_request(gw.port, "GET", "/plain")
    by_consumer = gw.admin("GET", "/analytics?by=consumer&window=15m").json()
    rows = {r["key"]: r for r in by_consumer["rows"]}
    assert by_consumer["window_s"] == 900 and [r["key"] for r in by_consumer["rows"]][:2] == ["acme", "globex"]
    assert rows["acme"]["requests"] == 12 and rows["globex"]["requests"] == 3 and rows["-"]["requests"] == 1
    assert rows["acme"]["errors"] == 0 and rows["acme"]["p50_ms"] > 0
    by_route = {r["key"]: r["requests"] for r in gw.admin("GET", "/analytics?by=route&window=5m").json()["rows"]}
    assert by_route == {"partners": 15, "all": 1}
    by_service = gw.admin("GET", "/analytics?by=service").json()["rows"]
    assert [(r["key"], r["requests"]) for r in by_service] == [("shop", 16)]
    assert gw.admin("GET", "/analytics?by=planet").status == 400
    assert gw.admin("GET", "/analytics?window=2h").status == 400


def test_dashboard_files_are_served_and_data_needs_the_token(gateway, start_upstream):
    up = start_upstream(RecordingUpstream())
    gw = gateway(dashboard_config([up.port], token="t0ken"))
    page = gw.admin("GET", "/", token=None)
    assert page.status == 200 and page.header("content-type").startswith("text/html")
    assert b"dashboard.js" in page.body and not OFF_SITE.search(page.body)
    for name, kind in (("/dashboard.js", "text/javascript"), ("/dashboard.css", "text/css")):
        asset = gw.admin("GET", name, token=None)
        assert asset.status == 200 and asset.header("content-type").startswith(kind)
        assert not OFF_SITE.search(asset.body)          # nothing loaded from elsewhere (the browser test checks too)
    assert gw.admin("GET", "/events", token=None).status == 401
    assert gw.admin("GET", "/analytics", token=None).status == 401
    assert read_events(gw.admin_port, 1, token="t0ken")[0]["config_version"] == 1


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                    reason="no chromium here (CI installs Debian's chromium)")
def test_dashboard_in_a_real_browser(gateway, start_upstream):
    from playwright.sync_api import sync_playwright

    ups = [start_upstream(RecordingUpstream(name=f"u{i}")) for i in range(2)]
    gw = gateway(dashboard_config([u.port for u in ups], token="t0ken"))
    url = f"http://{HOST}:{gw.admin_port}/"
    errors: list[str] = []
    with Load(gw.port), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            fetched: list[str] = []
            page.on("request", lambda r: fetched.append(r.url))
            page.goto(url)
            # The page asks for the admin token once.
            page.wait_for_selector("#token-form", state="visible", timeout=10000)
            page.fill("#token", "t0ken")
            page.click("#token-save")
            page.wait_for_function("Number(document.body.dataset.snapshots || 0) >= 3", timeout=15000)
            first = page.evaluate("document.body.dataset.updated")
            page.wait_for_function("Number(document.body.dataset.snapshots) >= 6", timeout=15000)
            # Real numbers that keep coming: requests/s and the route table are filled from live data.
            assert page.evaluate("document.body.dataset.updated") != first
            assert _number(page.inner_text("#total-rps")) > 5
            assert _number(page.inner_text('tr[data-route="all"] td.rps')) > 1
            assert page.locator("#rps-chart polyline, #rps-chart path").count() >= 1
            assert page.inner_text("#config-version").strip().lstrip("v") == "1"
            target = f"shop/{HOST}:{ups[1].port}"
            row = page.locator(f'tr[data-target="{target}"]')
            assert "healthy" in row.locator("td.health").inner_text().lower()
            # Drain the second target from the page: it stops receiving requests.
            row.locator("button.drain").click()
            page.wait_for_selector(f'tr[data-target="{target}"] button.enable', timeout=15000)
            wait_for(lambda: gw.admin("GET", "/services/shop/health").json()["targets"][1]["draining"], timeout=5)
            time.sleep(0.5)                         # requests already on their way to it finish
            before = len(ups[1].requests)
            time.sleep(1.5)
            assert len(ups[1].requests) == before, "a drained target still gets new requests"
            assert len(ups[0].requests) > 0
            page.wait_for_selector("#analytics-table tr[data-key='acme']", timeout=15000)
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            # Purge the cache and reload the config from the page.
            page.fill("#purge-prefix", "/catalog/")
            page.click("#purge")
            page.wait_for_selector("#notices .notice.ok:has-text('purged')", timeout=10000)
            page.click("#reload")
            page.wait_for_function("document.querySelector('#config-version').textContent.trim() === '3'",
                                   timeout=15000)
            # Re-enable it from the page again.
            page.locator(f'tr[data-target="{target}"] button.enable').click()
            wait_for(lambda: not gw.admin("GET", "/services/shop/health").json()["targets"][1]["draining"],
                     timeout=10)
        finally:
            browser.close()
    # Chromium logs the 401 of the page's token probe as a console error: that one is expected.
    errors = [e for e in errors if "status of 401" not in e]
    assert not errors, errors
    assert fetched and all(u.startswith(url) for u in fetched), [u for u in fetched if not u.startswith(url)]


def _number(text: str) -> float:
    digits = "".join(c for c in text if c.isdigit() or c == ".")
    return float(digits) if digits else 0.0


# --- what broke: answers by kind, unmatched traffic, listeners, history ---------------------------

def answers_config(up_port: int) -> dict:
    """One route per kind of answer an operator tells apart, and no catch-all: /nowhere matches none."""
    return {
        "version": 1,
        "listeners": [{"name": "public", "bind": f"{HOST}:{free_port()}"}],
        "admin": {"bind": f"{HOST}:{free_port()}"},
        "services": {"shop": {"targets": [{"address": f"{HOST}:{up_port}"}]},
                     "down": {"targets": [{"address": f"{HOST}:{free_port()}"}]}},     # nobody listens
        "consumers": [{"name": "acme", "credentials": {"api_keys": [
            "sha256:" + hashlib.sha256(b"acme").hexdigest()]}}],
        "routes": [
            {"name": "shop", "match": {"paths": ["/shop/**"]}, "service": "shop"},
            {"name": "private", "match": {"paths": ["/private/**"]}, "service": "shop", "plugins": [{"key_auth": {}}]},
            {"name": "blocked", "match": {"paths": ["/blocked/**"]}, "service": "shop",
             "plugins": [{"ip_filter": {"deny": ["127.0.0.0/8"]}}]},
            {"name": "limited", "match": {"paths": ["/limited/**"]}, "service": "shop",
             "plugins": [{"rate_limit": {"limit": 1, "window": "60s", "key": ["ip"]}}]},
            {"name": "broken", "match": {"paths": ["/broken/**"]}, "service": "down"},
        ],
    }


# (method, path, status): 5 x 200, 2 x 401, 3 x 403, 1 x 200 then 2 x 429, 2 x 502, 4 x 404 no_route.
TRAFFIC = ([("GET", "/shop/a", 200)] * 4 + [("HEAD", "/shop/b", 200)]
           + [("GET", "/private/x", 401), ("POST", "/private/x", 401)]
           + [("GET", "/blocked/x", 403)] * 3
           + [("GET", "/limited/x", 200)] + [("GET", "/limited/x", 429)] * 2
           + [("GET", "/broken/x", 502)] * 2
           + [("GET", "/nowhere", 404), ("HEAD", "/nowhere", 404), ("GET", "/Shop/a", 404), ("GET", "/other/x", 404)])
EXPECTED_ROUTES = {   # requests, then answers 401, 403, 429, other 4xx, 5xx (cumulative)
    "shop": (5, [0, 0, 0, 0, 0]), "private": (2, [2, 0, 0, 0, 0]), "blocked": (3, [0, 3, 0, 0, 0]),
    "limited": (3, [0, 0, 2, 0, 0]), "broken": (2, [0, 0, 0, 0, 2]),
}
EXPECTED_UNMATCHED = (4, [0, 0, 0, 4, 0])
ANSWER_KEYS = ["401", "403", "429", "4xx", "5xx"]


def send_traffic(port: int) -> None:
    for method, path, status in TRAFFIC:
        resp = http_request(port, method, path)
        assert resp.status == status, (method, path, resp.status, resp.body[:200])
        if status == 404:
            assert method == "HEAD" or json.loads(resp.body)["error"]["code"] == "no_route"


def test_events_count_answers_by_kind_unmatched_listeners_version(gateway, start_upstream):
    from fastgw import __version__

    up = start_upstream(RecordingUpstream())
    gw = gateway(answers_config(up.port))
    send_traffic(gw.port)
    held = http.client.HTTPConnection(HOST, gw.port, timeout=5)          # a keep-alive connection, held open
    assert http_request(gw.port, "GET", "/shop/held", conn=held).status == 200
    try:
        snap = wait_for(lambda: (s := read_events(gw.admin_port, 1)[0])["totals"]["requests"] == len(TRAFFIC) + 1
                        and s["listeners"][0]["open"] == 1 and s, timeout=10)
    finally:
        held.close()
    routes = {r["name"]: (r["requests"], [r["answers"][k] for k in ANSWER_KEYS]) for r in snap["routes"]}
    assert routes == {**EXPECTED_ROUTES, "shop": (6, [0] * 5)}
    unmatched = snap["unmatched"]
    assert (unmatched["requests"], [unmatched["answers"][k] for k in ANSWER_KEYS]) == EXPECTED_UNMATCHED
    # The rows (routes and unmatched) add up to the totals.
    totals = snap["totals"]
    assert totals["requests"] == sum(r["requests"] for r in snap["routes"]) + unmatched["requests"] == 20
    assert [totals["answers"][k] for k in ANSWER_KEYS] == [2, 3, 2, 4, 2]
    [listener] = snap["listeners"]
    assert listener["name"] == "public" and listener["bind"] == f"{HOST}:{gw.port}" and listener["protocol"] == "http"
    assert listener["open"] == 1 and listener["accepted"] == len(TRAFFIC) + 1 and listener["rejected"] == 0
    assert snap["version"] == __version__ and 0 < snap["uptime_s"] < 120
    # Closed: no longer open.
    wait_for(lambda: read_events(gw.admin_port, 1)[0]["listeners"][0]["open"] == 0, timeout=10)


def test_history_has_every_request_of_the_last_minutes_at_once(gateway, start_upstream):
    up = start_upstream(RecordingUpstream())
    gw = gateway(answers_config(up.port))
    send_traffic(gw.port)
    history = gw.admin("GET", "/history?window=5m").json()
    minutes = history["minutes"]
    assert history["window_s"] == 300 and len(minutes) == 5
    assert [m["ts"] for m in minutes] == sorted(m["ts"] for m in minutes)
    assert all(abs(b["ts"] - a["ts"] - 60) < 0.01 for a, b in zip(minutes, minutes[1:]))
    current, now = minutes[-1], time.time()
    assert current["ts"] <= now < current["ts"] + 61                  # the current minute...
    assert 1 <= current["seconds"] <= now - current["ts"] + 1          # ...as far as the gateway has seen it
    # The traffic of a gateway started seconds ago is there, unmatched 404s included, not only
    # after a minute has passed.
    assert sum(m["requests"] for m in minutes) == len(TRAFFIC)
    assert sum(m["errors"] for m in minutes) == 2                               # the 502s
    busy = [m for m in minutes if m["requests"]]
    assert busy and all(m["p50_ms"] > 0 and m["seconds"] >= 1 for m in busy)
    assert gw.admin("GET", "/history?window=2h").status == 400
    assert gw.admin("GET", "/history?window=soon").status == 400


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                    reason="no chromium here (CI installs Debian's chromium)")
def test_dashboard_shows_what_broke_at_once_in_a_real_browser(gateway, start_upstream):
    from playwright.sync_api import sync_playwright

    from fastgw import __version__

    up = start_upstream(RecordingUpstream())
    gw = gateway(answers_config(up.port))
    send_traffic(gw.port)                                     # all of it before the page opens
    held = http.client.HTTPConnection(HOST, gw.port, timeout=5)
    assert http_request(gw.port, "GET", "/shop/held", conn=held).status == 200
    url = f"http://{HOST}:{gw.admin_port}/"
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            page.wait_for_function("Number(document.body.dataset.snapshots || 0) >= 1", timeout=10000)
            # Filled from the history at once: the minute buckets hold every request so far, and
            # the charts draw them besides the first live snapshot(s) (no waiting for a minute).
            shown = page.evaluate("""() => ({
                snapshots: Number(document.body.dataset.snapshots),
                history: Number(document.body.dataset.historyRequests),
                points: Number(document.querySelector('#rps-chart').dataset.points),
                historyPoints: Number(document.querySelector('#rps-chart').dataset.historyPoints),
                line: document.querySelector('#rps-chart path.series').getAttribute('d'),
                errorMax: Number(document.querySelector('#error-chart').dataset.max),
            })""")
            assert shown["history"] == len(TRAFFIC) + 1
            assert shown["historyPoints"] >= 1 and shown["points"] == shown["historyPoints"] + shown["snapshots"]
            assert "L" in shown["line"]                                  # a line, not a lone first dot
            assert shown["errorMax"] >= 0.1                              # 2 of 20 requests were 502s
            # The route table: requests and 401/403/429/other 4xx/5xx counts per route, the
            # unmatched requests as their own row, and a total row the rows add up to.
            table = page.evaluate("""() => [...document.querySelectorAll('#routes tbody tr, #routes tfoot tr')]
                .map((tr) => [tr.dataset.route ?? 'total', tr.querySelector('td.name').textContent,
                              ...['requests', 'a401', 'a403', 'a429', 'a4xx', 'a5xx'].map(
                                  (c) => Number(tr.querySelector('td.' + c).textContent.replace(/,/g, '')))])""")
            expected = {**EXPECTED_ROUTES, "shop": (6, [0] * 5), "": EXPECTED_UNMATCHED}
            rows = {key: (requests, answers) for key, _, requests, *answers in table}
            assert {k: v for k, v in rows.items() if k != "total"} == expected
            assert [name for key, name, *_ in table if key == ""] == ["no route (404)"]
            total_requests, total_answers = rows["total"]
            assert total_requests == len(TRAFFIC) + 1 == sum(r for k, (r, _) in rows.items() if k != "total")
            assert total_answers == [sum(a[i] for k, (_, a) in rows.items() if k != "total") for i in range(5)]
            assert total_answers == [2, 3, 2, 4, 2]
            # Listeners with their open connections: the held keep-alive connection, then none.
            listener = 'tr[data-listener="public"]'
            assert page.inner_text(f"{listener} td.bind") == f"{HOST}:{gw.port}"
            assert page.inner_text(f"{listener} td.open") == "1"
            assert page.inner_text(f"{listener} td.accepted") == str(len(TRAFFIC) + 1)
            held.close()
            page.wait_for_function(f"document.querySelector('{listener} td.open').textContent === '0'",
                                   timeout=10000)
            # The version and the uptime.
            assert page.inner_text("#version") == __version__
            uptime = page.inner_text("#uptime")
            assert re.fullmatch(r"\d+s|1m \d+s", uptime) and 0 < _number(uptime) < 200, uptime
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard-answers.png"), full_page=True)
        finally:
            held.close()
            browser.close()
    assert not errors, errors
