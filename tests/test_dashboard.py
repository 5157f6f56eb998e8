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
