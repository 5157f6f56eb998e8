"""The admin API through its real listener, against a running gateway with real upstreams:
status, config, CRUD, targets, persistence, tokens, metrics."""
from __future__ import annotations

import http.client
import subprocess
import sys
import threading
import time

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from fastgw.config.store import serialise

from upstreams import (HOST, RecordingUpstream, describe_request, free_port, proxy_config, route,
                       target_service, wait_for)


def admin_config(upstream_port: int, **admin) -> dict:
    config = proxy_config(upstream_port, service_opts={"balance": {"algorithm": "round_robin"}})
    config["admin"] = {"bind": f"{HOST}:{free_port()}", **admin}
    config["workers"] = 2
    return config


def ok(resp, status: int = 200) -> dict:
    assert resp.status == status, resp.body[:2000]
    return resp.json()


def test_status_and_readiness(gateway, upstream):
    gw = gateway(admin_config(upstream.port))
    status = ok(gw.admin("GET", "/status"))
    assert status["ready"] is True and status["config_version"] == 1
    assert len(status["workers"]) == 2 and all(w["running"] for w in status["workers"])
    assert all(w["heartbeat_age_s"] < 3 for w in status["workers"])
    assert ok(gw.admin("GET", "/status/ready")) == {"ready": True, "config_version": 1, "draining": False}


def test_put_route_is_validated_persisted_and_applied(gateway, upstream):
    gw = gateway(admin_config(upstream.port))
    before = gw.config_path.read_text()
    answer = ok(gw.admin("PUT", "/routes/hello", {"match": {"paths": ["/hello"]},
                                                   "respond": {"status": 201, "json": {"hi": 1}}}))
    assert answer["config_version"] == 2 and answer["persisted"] is True
    resp = gw.request("GET", "/hello")
    assert resp.status == 201 and resp.json() == {"hi": 1}
    # Persisted atomically: the file has the route, the previous text is FILE.bak.<time>.
    on_disk = yaml.safe_load(gw.config_path.read_text())
    assert [r["name"] for r in on_disk["routes"]] == ["all", "hello"]
    [backup] = gw.workdir.glob("gateway.yaml.bak.*")
    assert backup.read_text() == before
    assert ok(gw.admin("GET", "/routes/hello"))["respond"]["status"] == 201
    # Every worker runs it (new connections land on both).
    assert all(gw.request("GET", "/hello").status == 201 for _ in range(20))
    # Replace in place (keeps its position, so it still comes after `all`... which matches /**;
    # priority lifts it).
    ok(gw.admin("PUT", "/routes/hello", {"name": "hello", "priority": 5, "match": {"paths": ["/hello"]},
                                          "respond": {"status": 202, "body": "x"}}))
    assert gw.request("GET", "/hello").status == 202
    ok(gw.admin("DELETE", "/routes/hello"))
    assert gw.request("GET", "/hello").status == 200          # back to `all`
    assert gw.admin("GET", "/routes/hello").status == 404
    assert gw.admin("DELETE", "/routes/hello").status == 404


def test_invalid_change_is_400_with_check_messages_and_changes_nothing(gateway, upstream):
    gw = gateway(admin_config(upstream.port))
    before = gw.config_path.read_text()
    resp = gw.admin("PUT", "/routes/bad", {"match": {"paths": ["/x/{id"]}, "service": "nope"})
    error = resp.json()["error"]
    assert resp.status == 400 and error["code"] == "invalid_config"
    text = "\n".join(error["problems"])
    assert f"{gw.config_path}:" in text and "routes[1].service" in text and "nope" in text
    # The same lines `fastgw check` prints for the file the change would have written.
    bad = gw.workdir / "bad.yaml"
    bad.write_text(serialise({**yaml.safe_load(before), "routes": [
        *yaml.safe_load(before)["routes"], {"name": "bad", "match": {"paths": ["/x/{id"]}, "service": "nope"}]}, "yaml"))
    check = subprocess.run([sys.executable, "-m", "fastgw", "check", "-c", str(bad)],
                           capture_output=True, text=True)
    assert [line.replace(str(bad), str(gw.config_path)) for line in check.stdout.splitlines()] == error["problems"]
    assert gw.config_path.read_text() == before
    assert ok(gw.admin("GET", "/status"))["config_version"] == 1
    # Unknown keys, wrong types, bad JSON.
    assert gw.admin("PUT", "/services/x", {"targets": [{"adress": "1.2.3.4:5"}]}).status == 400
    assert gw.admin("PUT", "/services/x", b"{not json",
                    headers={"Content-Type": "application/json"}).json()["error"]["code"] == "invalid_json"
    assert gw.admin("PUT", "/routes/y", {"name": "other"}).status == 400


def test_config_get_validate_and_put(gateway, upstream, monkeypatch):
    config = admin_config(upstream.port, token="${TEST_ADMIN_TOKEN}")
    gw = gateway(config, env={"TEST_ADMIN_TOKEN": "s3cret"})
    gw.admin_token = "s3cret"
    current = ok(gw.admin("GET", "/config"))
    assert current["config_version"] == 1
    assert current["config"]["admin"]["token"] == "${TEST_ADMIN_TOKEN}"     # a reference, shown as written
    proposed = dict(current["config"])
    proposed["routes"] = [route("only", ["/only"], "up")]
    dry = ok(gw.admin("POST", "/config/validate", proposed))
    assert dry["valid"] is True
    assert dry["diff"]["routes"] == {"added": ["only"], "removed": ["all"], "changed": []}
    assert "-  name: all" in dry["diff"]["text"] or "- name: all" in dry["diff"]["text"]
    assert gw.request("GET", "/x").status == 200                           # dry run changed nothing
    bad = {**proposed, "routes": [route("only", ["/only"], "missing")]}
    dry_bad = ok(gw.admin("POST", "/config/validate", bad))
    assert dry_bad["valid"] is False and "missing" in dry_bad["errors"][0]
    assert ok(gw.admin("PUT", "/config", current))["config_version"] == 2  # GET's shape accepted back
    assert ok(gw.admin("PUT", "/config", proposed))["config_version"] == 3
    assert gw.request("GET", "/x").status == 404
    assert gw.request("GET", "/only").status == 200
    # The ${VAR} reference survives the write-back; the value never reaches the file.
    text = gw.config_path.read_text()
    assert "${TEST_ADMIN_TOKEN}" in text and "s3cret" not in text


def test_token_required_except_status(gateway, upstream):
    gw = gateway(admin_config(upstream.port, token="t0ken"))
    assert gw.admin("GET", "/status", token=None).status == 200
    assert gw.admin("GET", "/status/ready", token=None).status == 200
    for method, path in [("GET", "/config"), ("GET", "/metrics"), ("POST", "/reload"),
                         ("PUT", "/routes/x"), ("GET", "/services/up/health")]:
        resp = gw.admin(method, path, token=None)
        assert resp.status == 401, (method, path)
        assert resp.header("www-authenticate", "").startswith("Bearer")
        assert gw.admin(method, path, token="wrong").status == 401
    assert gw.admin("GET", "/config").status == 200


def test_admin_beyond_loopback_needs_a_token(harness, upstream):
    config = admin_config(upstream.port)
    config["admin"]["bind"] = f"0.0.0.0:{free_port()}"
    with pytest.raises(RuntimeError, match="admin.bind"):
        harness.gateway(config)


def _counting(name):
    return RecordingUpstream(name=name, handler=lambda req: describe_request(req, name))


def test_targets_add_reweight_drain_remove(gateway, start_upstream):
    a = start_upstream(_counting("a"))
    b = start_upstream(_counting("b"))
    gw = gateway(admin_config(a.port))
    ok(gw.admin("POST", "/services/up/targets", {"address": f"{HOST}:{b.port}", "weight": 1}))
    assert gw.admin("POST", "/services/up/targets", {"address": f"{HOST}:{b.port}"}).status == 409
    servers = {gw.request("GET", "/x").json()["server"] for _ in range(20)}
    assert servers == {"a", "b"}
    ok(gw.admin("PATCH", f"/services/up/targets/{HOST}:{b.port}", {"weight": 3}))
    assert yaml.safe_load(gw.config_path.read_text())["services"]["up"]["targets"][1]["weight"] == 3
    assert gw.admin("PATCH", f"/services/up/targets/{HOST}:{b.port}", {"zone": "x"}).status == 400
    health = ok(gw.admin("GET", "/services/up/health"))
    assert health["service"] == "up" and [t["address"] for t in health["targets"]] == [
        f"{HOST}:{a.port}", f"{HOST}:{b.port}"]
    assert {k for k in health["targets"][0]} == {"address", "healthy", "ejected", "circuit", "active",
                                                  "ewma_ms", "weight", "draining"}
    assert health["targets"][0]["ewma_ms"] > 0 and health["targets"][1]["weight"] == 3

    # Drain b: no new requests reach it.
    ok(gw.admin("PATCH", f"/services/up/targets/{HOST}:{b.port}", {"drain": True}))
    b_count = len(b.requests)
    assert all(gw.request("GET", "/x").json()["server"] == "a" for _ in range(20))
    assert len(b.requests) == b_count
    assert ok(gw.admin("GET", "/services/up/health"))["targets"][1]["draining"] is True
    ok(gw.admin("PATCH", f"/services/up/targets/{HOST}:{b.port}", {"drain": False}))
    assert {gw.request("GET", "/x").json()["server"] for _ in range(20)} == {"a", "b"}
    ok(gw.admin("DELETE", f"/services/up/targets/{HOST}:{b.port}"))
    assert all(gw.request("GET", "/x").json()["server"] == "a" for _ in range(10))
    assert gw.admin("DELETE", f"/services/up/targets/{HOST}:{b.port}").status == 404
    assert gw.admin("GET", "/services/nope/health").status == 404


def test_draining_a_target_lets_its_in_flight_requests_finish(gateway, start_upstream):
    slow = start_upstream(RecordingUpstream(name="slow", handler=lambda req: (
        time.sleep(1.0), describe_request(req, "slow"))[1]))
    gw = gateway(admin_config(slow.port))
    results = []

    def call():
        results.append(gw.request("GET", "/x", timeout=10).status)
    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    assert wait_for(lambda: len(slow.requests) == 4)
    ok(gw.admin("PATCH", f"/services/up/targets/{HOST}:{slow.port}", {"drain": True}))
    for t in threads:
        t.join(10)
    assert results == [200] * 4
    resp = gw.request("GET", "/x")
    assert resp.status == 503 and resp.json()["error"]["code"] == "no_healthy_upstream"


def test_service_and_consumer_crud(gateway, start_upstream, upstream):
    other = start_upstream(_counting("other"))
    gw = gateway(admin_config(upstream.port))
    ok(gw.admin("PUT", "/services/second", target_service(other.port)))
    ok(gw.admin("PUT", "/routes/second", route("second", ["/second/**"], "second", priority=1)))
    assert gw.request("GET", "/second/x").json()["server"] == "other"
    assert ok(gw.admin("GET", "/services/second"))["targets"][0]["address"] == f"{HOST}:{other.port}"
    # A service a route still uses cannot go.
    resp = gw.admin("DELETE", "/services/second")
    assert resp.status == 400 and "second" in resp.json()["error"]["message"]
    ok(gw.admin("DELETE", "/routes/second"))
    ok(gw.admin("DELETE", "/services/second"))
    assert gw.admin("GET", "/services/second").status == 404

    key = "sha256:" + "ab" * 32
    ok(gw.admin("PUT", "/consumers/acme", {"groups": ["partners"], "credentials": {"api_keys": [key]}}))
    shown = ok(gw.admin("GET", "/consumers/acme"))
    assert shown["groups"] == ["partners"] and shown["credentials"]["api_keys"] == ["<redacted>"]
    assert yaml.safe_load(gw.config_path.read_text())["consumers"][0]["credentials"]["api_keys"] == [key]
    # GET-then-PUT keeps the secret it did not show.
    shown["groups"] = ["partners", "beta"]
    ok(gw.admin("PUT", "/consumers/acme", shown))
    assert yaml.safe_load(gw.config_path.read_text())["consumers"][0]["credentials"]["api_keys"] == [key]
    resp = gw.admin("PUT", "/consumers/bad", {"credentials": {"api_keys": ["plain-text-key"]}})
    assert resp.status == 400 and "fastgw hash key" in resp.json()["error"]["message"]
    ok(gw.admin("DELETE", "/consumers/acme"))
    assert gw.admin("GET", "/consumers/acme").status == 404


def test_reload_endpoint_and_cli(gateway, upstream):
    gw = gateway(admin_config(upstream.port, token="tok"))
    config = yaml.safe_load(gw.config_path.read_text())
    config["routes"].insert(0, route("fresh", ["/fresh"], None, respond={"status": 204}))
    gw.config_path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "fastgw", "reload", "-c", str(gw.config_path),
                             "--token", "tok"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "config version 2" in result.stdout
    assert gw.request("GET", "/fresh").status == 204
    gw.config_path.write_text("listeners: 5\n")
    result = subprocess.run([sys.executable, "-m", "fastgw", "reload", "--admin",
                             f"http://{HOST}:{gw.admin_port}", "--token", "tok"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "listeners" in result.stderr
    assert gw.request("GET", "/fresh").status == 204


def test_metrics_are_valid_prometheus_text(gateway, upstream):
    gw = gateway(admin_config(upstream.port))
    for _ in range(5):
        gw.request("GET", "/x")
    gw.request("DELETE", "/x")
    ok(gw.admin("PUT", "/routes/gone", route("gone", ["/gone"], None, respond={"status": 410})))
    gw.request("GET", "/gone")
    resp = gw.admin("GET", "/metrics")
    assert resp.status == 200 and resp.header("content-type").startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(resp.body.decode())}
    for name in ("fastgw_http_requests", "fastgw_http_request_duration_seconds",
                 "fastgw_upstream_request_duration_seconds", "fastgw_upstream_target_healthy",
                 "fastgw_circuit_breaker_state", "fastgw_open_connections", "fastgw_config_reloads",
                 "fastgw_config_version", "fastgw_build_info"):
        assert name in families, name
    requests = {(s.labels["route"], s.labels["method"], s.labels["code"]): s.value
                for s in families["fastgw_http_requests"].samples}
    assert requests[("all", "GET", "200")] == 5 and requests[("all", "DELETE", "200")] == 1
    assert requests[("gone", "GET", "410")] == 1
    assert [s.value for s in families["fastgw_config_version"].samples] == [2]
    reloads = {s.labels["result"]: s.value for s in families["fastgw_config_reloads"].samples
               if s.name.endswith("_total")}
    assert reloads == {"ok": 1, "error": 0}
    buckets = [s for s in families["fastgw_http_request_duration_seconds"].samples
               if s.name.endswith("_bucket") and s.labels["route"] == "all"]
    assert [b.value for b in buckets] == sorted(b.value for b in buckets) and buckets[-1].value == 6


def test_admin_http_edges(gateway, upstream):
    gw = gateway(admin_config(upstream.port))
    assert gw.admin("GET", "/nope").status == 404
    resp = gw.admin("DELETE", "/status")
    assert resp.status == 405 and "GET" in resp.header("allow")
    conn = http.client.HTTPConnection(HOST, gw.admin_port, timeout=5)
    for _ in range(3):                                   # keep-alive
        conn.request("GET", "/status")
        assert conn.getresponse().read()
    conn.close()
    big = b"{" + b" " * (11 * 1024 * 1024) + b"}"
    try:
        assert gw.admin("PUT", "/config", big).status == 413
    except (ConnectionError, http.client.HTTPException):
        pass                                             # closed while we were still sending
    assert gw.admin("GET", "/status").status == 200


def test_toml_config_is_served_but_not_written(harness, upstream, tmp_path):
    config = admin_config(upstream.port)
    gw = harness.gateway(config)
    gw.stop()
    toml = gw.workdir / "gateway.toml"
    toml.write_text(f"""\
workers = 1
[[listeners]]
name = "public"
bind = "{config['listeners'][0]['bind']}"
[admin]
bind = "{config['admin']['bind']}"
[services.up]
targets = [{{address = "{HOST}:{upstream.port}"}}]
[[routes]]
name = "all"
service = "up"
""")
    env = {**__import__("os").environ}
    proc = subprocess.Popen([sys.executable, "-m", "fastgw", "run", "-c", str(toml)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        assert wait_for(lambda: gw.admin("GET", "/status/ready").status == 200
                        if _up(gw.admin_port) else False, timeout=10)
        resp = gw.admin("PUT", "/routes/x", {"respond": {"status": 204}, "match": {"paths": ["/x"]}})
        assert resp.status == 409 and "TOML" in resp.json()["error"]["message"]
        assert "[[routes]]" in toml.read_text() and "/x" not in toml.read_text()
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def _up(port: int) -> bool:
    import socket
    try:
        socket.create_connection((HOST, port), timeout=0.2).close()
        return True
    except OSError:
        return False


def test_a_change_that_cannot_be_written_is_not_applied(gateway, upstream):
    gw = gateway(admin_config(upstream.port))
    before = gw.config_path.read_text()
    # The backup cannot be written: the file (reached through a symlink, written through) has a
    # name with no room for ".bak.<time>" (NAME_MAX is 255), which stops root too.
    real = gw.config_path.rename(gw.workdir / ("g" * 240 + ".yaml"))
    gw.config_path.symlink_to(real.name)
    resp = gw.admin("PUT", "/routes/hello", {"match": {"paths": ["/hello"]}, "respond": {"status": 201}})
    assert resp.status == 500 and resp.json()["error"]["code"] == "not_persisted"
    assert "gateway.yaml" in resp.json()["error"]["message"]
    assert gw.config_path.read_text() == before
    assert not [p for p in gw.workdir.iterdir() if p.name.startswith(".fastgw-")]   # no temp file left
    assert gw.request("GET", "/hello").status == 200               # still `all`, in every worker
    assert all(gw.request("GET", "/hello").status == 200 for _ in range(10))
    status = gw.admin("GET", "/status").json()
    assert status["config_version"] == 1 and status["ready"] and status["reload"]["ok"] is False


def test_listings_show_what_the_single_endpoints_show_with_secrets_redacted(gateway, start_upstream, upstream):
    other = start_upstream(RecordingUpstream())
    config = admin_config(upstream.port)
    config["services"]["second"] = target_service(other.port)
    config["routes"].insert(0, route("signed", ["/signed/**"], "second",
                                     request_headers={"set": {"Authorization": "Bearer upstream-secret",
                                                              "X-Tenant": "t1"}}))
    config["consumers"] = [{"name": "acme", "credentials": {"api_keys": ["sha256:" + "ab" * 32]}},
                           {"name": "globex", "groups": ["partners"]}]
    gw = gateway(config)
    services = ok(gw.admin("GET", "/services"))
    assert services["config_version"] == 1 and list(services["services"]) == ["up", "second"]
    for name, shown in services["services"].items():
        assert shown == ok(gw.admin("GET", f"/services/{name}"))
    routes = ok(gw.admin("GET", "/routes"))["routes"]
    assert [r["name"] for r in routes] == ["signed", "all"]                  # match order, as in the file
    assert routes == [ok(gw.admin("GET", f"/routes/{r['name']}")) for r in routes]
    assert routes[0]["request_headers"]["set"] == {"Authorization": "<redacted>", "X-Tenant": "t1"}
    consumers = ok(gw.admin("GET", "/consumers"))["consumers"]
    assert consumers == [ok(gw.admin("GET", "/consumers/acme")), ok(gw.admin("GET", "/consumers/globex"))]
    assert consumers[0]["credentials"]["api_keys"] == ["<redacted>"]
    raw = b"".join(gw.admin("GET", path).body for path in ("/services", "/routes", "/consumers"))
    assert b"upstream-secret" not in raw and b"ab" * 32 not in raw
    # HEAD answers like GET without a body; a change shows in the next listing.
    head = gw.admin("HEAD", "/routes")
    assert head.status == 200 and head.body == b""
    ok(gw.admin("DELETE", "/routes/signed"))
    after = ok(gw.admin("GET", "/routes"))
    assert after["config_version"] == 2 and [r["name"] for r in after["routes"]] == ["all"]
    assert gw.admin("POST", "/routes", {}).status == 405


def test_admin_changes_are_logged_and_keep_the_last_n_backups(gateway, start_upstream, upstream):
    other = start_upstream(RecordingUpstream())
    config = admin_config(upstream.port, backups=2)
    config["services"]["up"]["targets"].append({"address": f"{HOST}:{other.port}"})
    gw = gateway(config)
    texts = [gw.config_path.read_text()]
    ok(gw.admin("PATCH", f"/services/up/targets/{HOST}:{other.port}", {"weight": 5}))
    texts.append(gw.config_path.read_text())
    key = "sha256:" + "cd" * 32
    ok(gw.admin("PUT", "/consumers/acme", {"groups": ["partners"], "credentials": {"api_keys": [key]}}))
    texts.append(gw.config_path.read_text())
    new_key = "sha256:" + "ef" * 32
    ok(gw.admin("PUT", "/consumers/acme", {"groups": ["partners", "beta"], "credentials": {"api_keys": [new_key]}}))
    texts.append(gw.config_path.read_text())
    ok(gw.admin("PATCH", f"/services/up/targets/{HOST}:{other.port}", {"weight": 2}))
    texts.append(gw.config_path.read_text())
    ok(gw.admin("PUT", "/routes/s", route("s", ["/s/**"], "up",
                                         request_headers={"set": {"Authorization": "Bearer upstream-secret"}})))
    texts.append(gw.config_path.read_text())
    ok(gw.admin("DELETE", f"/services/up/targets/{HOST}:{upstream.port}"))
    texts.append(gw.config_path.read_text())
    ok(gw.admin("DELETE", "/routes/s"))
    assert gw.admin("PATCH", "/services/up/targets/10.9.9.9:1", {"weight": 2}).status == 404   # not applied

    log = wait_for(lambda: [line for line in gw.stderr_text().splitlines() if "admin: " in line]
                   if gw.stderr_text().count("admin: ") >= 7 else None)
    assert [line.split("admin: ", 1)[1] for line in log] == [
        "PATCH service up: targets[1].weight unset -> 5",        # the file did not set it
        'PUT consumer acme: added {"name":"acme","groups":["partners"],"credentials":{"api_keys":["<redacted>"]}}',
        'PUT consumer acme: groups[1] added "beta", credentials.api_keys[0] "<redacted>" -> "<redacted>"',
        "PATCH service up: targets[1].weight 5 -> 2",
        'PUT route s: added {"name":"s","match":{"paths":["/s/**"]},'
        '"request_headers":{"set":{"Authorization":"<redacted>"}},"service":"up"}',
        "DELETE service up: targets[0] removed",
        "DELETE route s: removed",
    ]
    stderr = gw.stderr_text()
    assert key not in stderr and new_key not in stderr and "upstream-secret" not in stderr
    # admin.backups: 2 after seven changes: the two newest, the newest = the config before the last change.
    backups = sorted(gw.workdir.glob("gateway.yaml.bak.*"))
    assert [b.read_text() for b in backups] == texts[-2:]
