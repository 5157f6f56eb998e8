"""The access log's fields (json and combined) and the gateway's own messages as JSON lines."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from fastgw.plugins.credentials import hash_key
from upstreams import (HOST, free_port, gateway_config, get_request, http_request, route, target_service,
                       wait_for)

TESTS = str(Path(__file__).resolve().parent)
REPO = Path(__file__).resolve().parent.parent
MESSAGE_KEYS = {"time", "level", "process", "message"}


def logged_config(upstream_port: int, fmt: str = "json") -> dict:
    """Three routes: one that strips a prefix, one that rewrites the path and query, one limited."""
    config = gateway_config({"up": target_service(upstream_port)}, [
        route("strip", ["/api/**"], "up", rewrite={"strip_prefix": "/api"}),
        route("rewrite", ["/v1/users/{id}"], "up", rewrite={"path": "/users/{id}", "query": "?v=1"}),
        {**route("limited", ["/limited/**"], "up"),
         "plugins": [{"rate_limit": {"limit": 2, "window": "10s", "algorithm": "fixed_window",
                                     "key": ["ip"], "name": "small"}}]},
        route("all", ["/**"], "up")])
    config["log"] = {"access": {"format": fmt}}
    return config


def combined_lines(gw, count: int) -> list[str]:
    def read():
        text = gw.access_log_path.read_text() if gw.access_log_path.exists() else ""
        lines = text.splitlines()
        return lines if len(lines) >= count else None
    return wait_for(read) or []


# --- access log fields ---------------------------------------------------------------------------

def test_json_access_log_has_uri_upstream_uri_and_protocol(gateway, upstream):
    gw = gateway(logged_config(upstream.port))
    with gw.connect() as c:
        assert c.request(get_request("/api/orders/7?page=2&q=a%20b")).status == 200
        assert c.request(get_request("/v1/users/42?debug=1")).status == 200
        assert c.request(get_request("/plain/x?")).status == 200
    with gw.connect() as c:
        assert c.request(get_request("/head/me?x=1", method="HEAD", version="HTTP/1.0"),
                         head_request=True).status == 200
    assert upstream.targets == ["/orders/7?page=2&q=a%20b", "/users/42?v=1", "/plain/x?", "/head/me?x=1"]
    lines = gw.access_log_lines(4)
    fields = [{k: line[k] for k in ("method", "uri", "path", "upstream_uri", "protocol", "route")}
              for line in lines]
    assert fields == [
        {"method": "GET", "uri": "/api/orders/7?page=2&q=a%20b", "path": "/api/orders/7",
         "upstream_uri": "/orders/7?page=2&q=a%20b", "protocol": "HTTP/1.1", "route": "strip"},
        {"method": "GET", "uri": "/v1/users/42?debug=1", "path": "/v1/users/42",
         "upstream_uri": "/users/42?v=1", "protocol": "HTTP/1.1", "route": "rewrite"},
        {"method": "GET", "uri": "/plain/x?", "path": "/plain/x", "upstream_uri": "/plain/x?",
         "protocol": "HTTP/1.1", "route": "all"},
        {"method": "HEAD", "uri": "/head/me?x=1", "path": "/head/me", "upstream_uri": "/head/me?x=1",
         "protocol": "HTTP/1.0", "route": "all"}]
    assert all(line["ratelimit"] is None for line in lines)      # no rate limit on these routes


def test_json_access_log_without_upstream_has_no_upstream_uri(gateway, upstream):
    config = logged_config(upstream.port)
    config["routes"] = config["routes"][:1]                      # only /api/**: the rest is 404
    gw = gateway(config)
    assert gw.request("GET", "/nowhere?a=1").status == 404
    line = gw.access_log_lines(1)[0]
    assert (line["uri"], line["upstream_uri"], line["flags"], line["route"]) == ("/nowhere?a=1", None, "NR", None)
    assert upstream.requests == []


def test_json_access_log_ratelimit_holds_the_decision(gateway, upstream):
    gw = gateway(logged_config(upstream.port))
    statuses = [gw.request("GET", "/limited/x?n=%d" % i).status for i in range(3)]
    assert statuses == [200, 200, 429]
    lines = gw.access_log_lines(3)
    assert [line["ratelimit"] for line in lines] == [
        {"policy": "small", "limit": 2, "window_s": 10.0, "remaining": 1, "admitted": True},
        {"policy": "small", "limit": 2, "window_s": 10.0, "remaining": 0, "admitted": True},
        {"policy": "small", "limit": 2, "window_s": 10.0, "remaining": 0, "admitted": False}]
    assert [line["flags"] for line in lines] == ["-", "-", "RL"]
    assert lines[2]["upstream_uri"] is None and len(upstream.requests) == 2


def test_ratelimit_names_the_limit_that_binds(gateway, upstream):
    """Two limits: the one with fewer requests left, and the one that refused even when the other,
    decided first, has as few left."""
    config = logged_config(upstream.port)
    config["routes"][2]["plugins"] += [
        {"rate_limit": {"limit": 100, "window": "10s", "key": ["ip"], "name": "wide"}},
        {"rate_limit": {"limit": 1, "window": "10s", "algorithm": "fixed_window", "key": ["ip"], "name": "tiny"}}]
    gw = gateway(config)
    assert [gw.request("GET", "/limited/x").status for _ in range(2)] == [200, 429]
    decided = [(e["ratelimit"]["policy"], e["ratelimit"]["remaining"], e["ratelimit"]["admitted"])
               for e in gw.access_log_lines(2)]
    assert decided == [("tiny", 0, True), ("tiny", 0, False)]    # "small" had 1 left, then 0


def test_combined_access_log_has_the_request_line_as_sent_and_the_extra_fields(gateway, upstream):
    gw = gateway(logged_config(upstream.port, fmt="combined"))
    with gw.connect() as c:
        c.request(get_request("/api/orders/7?page=2", headers=[("X-Request-Id", "rid-1"),
                                                                ("User-Agent", "tests/1")]))
        c.request(get_request("/limited/a?b=c", headers=[("X-Request-Id", "rid-2")]))
    with gw.connect() as c:
        c.request(get_request("/v1/users/42?x=1", method="HEAD", version="HTTP/1.0",
                              headers=[("X-Request-Id", "rid-3")]), head_request=True)
    lines = combined_lines(gw, 3)
    stamp = r"\[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d \+0000\]"
    assert re.fullmatch(r'127\.0\.0\.1 - - ' + stamp + r' "GET /api/orders/7\?page=2 HTTP/1\.1" 200 \d+ '
                        r'"-" "tests/1" [\d.e-]+ "rid-1" "/orders/7\?page=2" "-"', lines[0]), lines[0]
    assert re.fullmatch(r'127\.0\.0\.1 - - ' + stamp + r' "GET /limited/a\?b=c HTTP/1\.1" 200 \d+ '
                        r'"-" "-" [\d.e-]+ "rid-2" "/limited/a\?b=c" "small;q=2;w=10;r=1;allowed"',
                        lines[1]), lines[1]
    assert re.fullmatch(r'127\.0\.0\.1 - - ' + stamp + r' "HEAD /v1/users/42\?x=1 HTTP/1\.0" 200 \d+ '
                        r'"-" "-" [\d.e-]+ "rid-3" "/users/42\?v=1" "-"', lines[2]), lines[2]


def test_combined_access_log_names_the_consumer_and_a_refusal(gateway, upstream):
    config = logged_config(upstream.port, fmt="combined")
    config["routes"][2]["plugins"].insert(0, {"key_auth": {}})
    config["consumers"] = [{"name": "acme", "credentials": {"api_keys": [hash_key("k-acme")]}}]
    gw = gateway(config)
    for _ in range(3):
        gw.request("GET", "/limited/x", headers={"x-api-key": "k-acme"})
    lines = combined_lines(gw, 3)
    assert [line.split(" [")[0] for line in lines] == ["127.0.0.1 - acme"] * 2 + ["127.0.0.1 - -"], lines
    # (a limit keyed on ip is decided before authentication: the refused request has no consumer)
    assert lines[2].endswith('"small;q=2;w=10;r=0;refused"') and '" 429 ' in lines[2]


# --- the gateway's own messages ------------------------------------------------------------------

def parsed_messages(text: str) -> list[dict]:
    """Every line of stderr is one JSON object with the message keys (else the test fails here)."""
    messages = []
    for line in text.splitlines():
        entry = json.loads(line)
        assert MESSAGE_KEYS <= entry.keys(), line
        messages.append(entry)
    return messages


def test_json_messages_from_supervisor_and_workers(gateway, start_upstream, upstream):
    dead = free_port()                                        # nothing listens there
    config = gateway_config({"up": {"targets": [{"address": f"{HOST}:{upstream.port}"},
                                                {"address": f"{HOST}:{dead}"}],
                                    "balance": {"algorithm": "round_robin"},
                                    "health": {"passive": {"consecutive_failures": 1, "ejection_time": "30s"}}}},
                            [{**route("broken", ["/broken/**"], "up"),
                              "plugins": [{"python": {"module": "plugins_for_tests:Broken", "config": {}}}]},
                             route("all", ["/**"], "up")])
    config["workers"] = 2
    config["admin"] = {"bind": f"{HOST}:{free_port()}"}
    config["log"] = {"format": "json"}
    gw = gateway(config, env={"PYTHONPATH": TESTS})
    for _ in range(6):
        assert gw.request("GET", "/x").status == 200          # the dead one: retried elsewhere
    assert gw.request("GET", "/broken/x").status == 500
    assert gw.admin("POST", "/reload").status == 200
    assert wait_for(lambda: "config reloaded" in gw.stderr_text() and "RuntimeError" in gw.stderr_text())
    gw.stop()
    messages = parsed_messages(gw.stderr_text())
    processes = {m["process"] for m in messages}
    assert {"supervisor", "worker 0"} <= processes <= {"supervisor", "worker 0", "worker 1"}
    by_text = lambda part: [m for m in messages if part in m["message"]]    # noqa: E731
    assert by_text("workers running config version") and by_text("config reloaded: version 2")
    assert all(m["process"] == "supervisor" for m in by_text("config reloaded"))
    assert [m["process"] for m in by_text("listener public on")] == ["worker 0"]   # the others: debug
    ejected = by_text(f"ejected up target {HOST}:{dead}")
    assert ejected and ejected[0]["level"] == "warning" and ejected[0]["process"].startswith("worker ")
    failed = by_text("plugin failed on route broken")
    assert len(failed) == 1 and failed[0]["level"] == "error"
    assert "Traceback (most recent call last)" in failed[0]["traceback"]
    assert "RuntimeError: boom" in failed[0]["traceback"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", failed[0]["time"])


def test_text_is_the_default_format(gateway, upstream):
    config = gateway_config({"up": target_service(upstream.port)}, [
        {**route("broken", ["/broken/**"], "up"),
         "plugins": [{"python": {"module": "plugins_for_tests:Broken", "config": {}}}]}])
    config["workers"] = 2
    config["admin"] = {"bind": f"{HOST}:{free_port()}"}          # started = every worker serves
    gw = gateway(config, env={"PYTHONPATH": TESTS})
    assert gw.request("GET", "/broken/x").status == 500
    assert wait_for(lambda: "RuntimeError: boom" in gw.stderr_text() and "workers running" in gw.stderr_text())
    text = gw.stderr_text()
    assert re.search(r"^fastgw: 2 workers running config version 1", text, re.M), text
    assert re.search(r"^fastgw\[worker \d\]: listener public on", text, re.M), text
    assert re.search(r"^fastgw\[worker \d\]: plugin failed on route broken\nTraceback", text, re.M), text
    assert not text.lstrip().startswith("{")


def test_config_log_format_text_wins_over_the_environment(gateway, upstream):
    config = gateway_config({"up": target_service(upstream.port)}, [route("all", ["/**"], "up")])
    config["log"] = {"format": "text"}
    gw = gateway(config, env={"FASTGW_LOG_FORMAT": "json"})
    assert gw.request("GET", "/").status == 200
    assert wait_for(lambda: "listener public on" in gw.stderr_text())
    assert not any(line.startswith("{") for line in gw.stderr_text().splitlines())
    assert re.search(r"^fastgw\[worker \d\]: listener public on", gw.stderr_text(), re.M)


def test_a_config_error_at_start_follows_the_environment(tmp_path):
    bad = tmp_path / "gateway.yaml"
    bad.write_text("version: 1\nlisteners: []\nlog:\n  format: json\n  bogus: 1\n")
    run = lambda env: subprocess.run(                             # noqa: E731
        [sys.executable, "-m", "fastgw", "run", "-c", str(bad)], cwd=REPO, capture_output=True,
        text=True, timeout=60, env={"PATH": "/usr/bin:/bin", **env})
    as_json = run({"FASTGW_LOG_FORMAT": "json"})
    assert as_json.returncode == 1
    messages = parsed_messages(as_json.stderr)
    assert messages and all(m["level"] == "error" and m["process"] == "supervisor" for m in messages)
    assert any(m["message"].startswith(f"{bad}:5: log.bogus:") for m in messages), messages
    as_text = run({})
    assert as_text.returncode == 1
    assert re.search(rf"^fastgw: {re.escape(str(bad))}:5: log\.bogus:", as_text.stderr, re.M), as_text.stderr


def test_log_format_is_checked_with_file_line_and_key(tmp_path):
    bad = tmp_path / "gateway.yaml"
    bad.write_text("version: 1\nlisteners: []\nlog:\n  format: xml\n")
    out = subprocess.run([sys.executable, "-m", "fastgw", "check", "-c", str(bad)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert f"{bad}:4: log.format:" in out.stdout + out.stderr


def test_json_messages_and_json_access_log_share_one_stream(tmp_path, upstream):
    """stdout and stderr merged (2>&1): every line is one whole JSON object."""
    config = gateway_config({"up": target_service(upstream.port)}, [route("all", ["/**"], "up")])
    config["workers"] = 2
    config["log"] = {"format": "json", "access": {"path": "-", "format": "json"}}
    (tmp_path / "gateway.yaml").write_text(json.dumps(config))
    port = int(config["listeners"][0]["bind"].rsplit(":", 1)[1])
    merged = tmp_path / "merged.log"
    with open(merged, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fastgw", "run", "-c", str(tmp_path / "gateway.yaml")],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        assert wait_for(lambda: "2 workers running config version 1" in merged.read_text(), timeout=30)
        for i in range(20):
            assert http_request(port, "GET", f"/r/{i}?q={i}").status == 200
        assert wait_for(lambda: merged.read_text().count('"request_id"') >= 20)
    finally:
        proc.terminate()
        proc.wait(30)
    entries = [json.loads(line) for line in merged.read_text().splitlines()]
    access = [e for e in entries if "request_id" in e]
    assert sorted(e["uri"] for e in access) == sorted(f"/r/{i}?q={i}" for i in range(20))
    messages = [e for e in entries if "request_id" not in e]
    assert all(MESSAGE_KEYS <= e.keys() for e in messages)
    assert any("draining" in e["message"] for e in messages)
