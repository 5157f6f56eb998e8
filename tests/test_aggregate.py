"""Response aggregation and client profiles through the gateway's socket: real upstreams for
catalog, pricing and stock; one client call, one JSON answer."""
from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import time

import pytest
import yaml

from upstreams import HOST, RecordingUpstream, Reply, free_port, gateway_config, route


def json_reply(obj, status=200, delay=0.0, content_type="application/json"):
    def handler(req):
        if delay:
            time.sleep(delay)
        return Reply(status, [("Content-Type", content_type)], json.dumps(obj).encode())
    return handler


def product_page(catalog, pricing, stock, **aggregate):
    backends = [
        {"service": "catalog", "path": "/catalog/{id}", "into": "product"},
        {"service": "pricing", "path": "/prices/{id}", "into": "price", "allow": ["amount", "currency"]},
        {"service": "stock", "path": "/stock/{id}", "into": "stock", "optional": True},
    ]
    config = gateway_config(
        {"catalog": {"targets": [{"address": f"{HOST}:{catalog.port}"}]},
         "pricing": {"targets": [{"address": f"{HOST}:{pricing.port}"}]},
         "stock": {"targets": [{"address": f"{HOST}:{stock.port}"}]}},
        [route("product-page", ["/products/{id}"], methods=["GET"],
               aggregate={"timeout": "800ms", "backends": backends, **aggregate})])
    return config


@pytest.fixture
def shop(start_upstream):
    catalog = start_upstream(RecordingUpstream(json_reply(
        {"id": 7, "name": "Kettle", "thumb": "k.png", "sku": "K-7", "description": "long text"})))
    pricing = start_upstream(RecordingUpstream(json_reply(
        {"amount": 2999, "currency": "EUR", "internal_cost": 1200})))
    stock = start_upstream(RecordingUpstream(json_reply({"available": 12, "warehouse": "north"})))
    return catalog, pricing, stock


def test_product_page_merges_three_backends(gateway, shop):
    catalog, pricing, stock = shop
    gw = gateway(product_page(*shop))
    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    resp = gw.request("GET", "/products/7", headers={"traceparent": trace, "Accept-Language": "de"})
    assert resp.status == 200, resp.body
    assert resp.json() == {
        "product": {"id": 7, "name": "Kettle", "thumb": "k.png", "sku": "K-7", "description": "long text"},
        "price": {"amount": 2999, "currency": "EUR"},            # allow-list: internal_cost is gone
        "stock": {"available": 12, "warehouse": "north"}}
    assert resp.header("x-fastgw-completed") == "true"
    assert resp.header("content-type") == "application/json"
    calls = [catalog.requests[0], pricing.requests[0], stock.requests[0]]
    assert [c.path for c in calls] == ["/catalog/7", "/prices/7", "/stock/7"]
    # Every backend call carries the client's request id, its trace (a new span each) and chosen headers.
    assert {c.header("x-request-id") for c in calls} == {resp.header("x-request-id")}
    assert all(c.header("traceparent").startswith("00-0af7651916cd43dd8448eb211c80319c-") and
               c.header("traceparent") != trace for c in calls)
    assert all(c.header("accept-language") == "de" and c.header("x-forwarded-for") == HOST for c in calls)
    assert all(c.header("x-fastgw-service") is None for c in calls)
    line = [e for e in gw.access_log_lines(1) if e["path"] == "/products/7"][0]
    assert line["route"] == "product-page" and line["status"] == 200


def test_backends_are_called_concurrently(gateway, start_upstream):
    slow = [start_upstream(RecordingUpstream(json_reply({"n": i}, delay=0.4))) for i in range(3)]
    config = product_page(*slow, timeout="3s")
    gw = gateway(config)
    started = time.monotonic()
    resp = gw.request("GET", "/products/1")
    elapsed = time.monotonic() - started
    assert resp.status == 200 and resp.header("x-fastgw-completed") == "true", resp.body
    assert elapsed < 1.0, f"{elapsed:.2f}s: three 0.4s backends one after another would take 1.2s"


@pytest.mark.parametrize("failure", ["status", "timeout", "not_json"])
def test_optional_backend_failing_is_left_out(gateway, shop, start_upstream, failure):
    catalog, pricing, _ = shop
    bad = start_upstream(RecordingUpstream({
        "status": json_reply({"error": "x"}, status=500),
        "timeout": json_reply({"available": 1}, delay=2.0),
        "not_json": json_reply("plain", content_type="text/plain"),
    }[failure]))
    gw = gateway(product_page(catalog, pricing, bad))
    started = time.monotonic()
    resp = gw.request("GET", "/products/7")
    assert resp.status == 200, resp.body
    assert set(resp.json()) == {"product", "price"}
    assert resp.header("x-fastgw-completed") == "false"
    assert time.monotonic() - started < 1.6              # the 800ms aggregate timeout, not the 2s backend


@pytest.mark.parametrize("failure,reason", [
    ("status", "status 503"), ("not_json", "not JSON"), ("garbage", "not valid JSON"),
    ("too_big", "larger than 1024 bytes"), ("down", "status 502")])
def test_required_backend_failing_is_a_502_naming_it(gateway, shop, start_upstream, failure, reason):
    catalog, _, stock = shop
    if failure == "down":
        port = free_port()                                # nothing listens there
    else:
        port = start_upstream(RecordingUpstream({
            "status": json_reply({}, status=503),
            "not_json": json_reply("x", content_type="text/html"),
            "garbage": lambda req: Reply(200, [("Content-Type", "application/json")], b"{not json"),
            "too_big": json_reply({"amount": "9" * 4000}),
        }[failure])).port
    config = product_page(catalog, catalog, stock, max_body_bytes="1KiB")
    config["services"]["pricing"] = {"targets": [{"address": f"{HOST}:{port}"}]}
    gw = gateway(config)
    resp = gw.request("GET", "/products/7")
    assert resp.status == 502, resp.body
    error = resp.json()["error"]
    assert error["code"] == "aggregate_backend_failed" and "backend price (service pricing)" in error["message"]
    assert reason in error["message"], error
    assert error["request_id"] == resp.header("x-request-id")


def test_chained_call_uses_a_field_of_an_earlier_result(gateway, shop):
    catalog, pricing, stock = shop
    config = product_page(*shop)
    config["routes"][0]["aggregate"]["backends"][2]["path"] = "/stock/{product.sku}"
    gw = gateway(config)
    resp = gw.request("GET", "/products/7")
    assert resp.status == 200 and resp.json()["stock"]["available"] == 12
    assert stock.requests[0].path == "/stock/K-7"


def test_flat_merge_deny_and_rename(gateway, shop):
    catalog, pricing, stock = shop
    config = product_page(*shop)
    config["routes"][0]["aggregate"]["backends"] = [
        {"service": "catalog", "path": "/catalog/{id}", "deny": ["description", "sku"],
         "rename": {"thumb": "image"}},
        {"service": "stock", "path": "/stock/{id}", "allow": ["available"]},
    ]
    gw = gateway(config)
    resp = gw.request("GET", "/products/7")
    assert resp.json() == {"id": 7, "name": "Kettle", "image": "k.png", "available": 12}


def test_calls_go_through_the_load_balancer_with_its_retries(gateway, shop):
    catalog, pricing, stock = shop
    config = product_page(*shop)
    config["services"]["pricing"] = {
        "targets": [{"address": f"{HOST}:{free_port()}"}, {"address": f"{HOST}:{pricing.port}"}],
        "balance": {"algorithm": "round_robin"},
        "retries": {"attempts": 2, "retry_on": ["connect_failure"]}}
    gw = gateway(config)
    for _ in range(4):                     # half the picks land on the dead target first
        assert gw.request("GET", "/products/7").status == 200
    assert len(pricing.requests) == 4


def test_authenticated_consumer_reaches_every_backend(gateway, shop):
    catalog, pricing, stock = shop
    config = product_page(*shop)
    config["routes"][0]["plugins"] = [{"key_auth": {"header": "x-api-key"}}]
    config["consumers"] = [{"name": "acme", "credentials": {
        "api_keys": ["sha256:" + hashlib.sha256(b"secret").hexdigest()]}}]
    gw = gateway(config)
    assert gw.request("GET", "/products/7").status == 401
    resp = gw.request("GET", "/products/7", headers={"x-api-key": "secret", "x-consumer-name": "forged"})
    assert resp.status == 200
    assert {c.header("x-consumer-name") for c in
            (catalog.requests[0], pricing.requests[0], stock.requests[0])} == {"acme"}


PROFILES = {
    "clients": {"mobile": {"match": {"headers": {"user-agent": "~(?i)(android|iphone)"}}},
                "iot": {"match": {"headers": {"x-device-class": "iot"}}}},
}


def test_profiles_reshape_the_aggregated_answer(gateway, shop):
    config = product_page(*shop) | PROFILES
    config["routes"][0]["profiles"] = {
        "mobile": {"allow": ["product.id", "product.name", "product.thumb", "price"]},
        "iot": {"allow": ["product.id", "stock.available"]}}
    gw = gateway(config)
    web = gw.request("GET", "/products/7", headers={"User-Agent": "Mozilla/5.0 (X11; Linux)"}).json()
    mobile = gw.request("GET", "/products/7", headers={"User-Agent": "MyApp/3 (iPhone; iOS 17)"}).json()
    iot = gw.request("GET", "/products/7", headers={"X-Device-Class": "iot"}).json()
    assert set(web) == {"product", "price", "stock"} and "description" in web["product"]
    assert mobile == {"product": {"id": 7, "name": "Kettle", "thumb": "k.png"},
                      "price": {"amount": 2999, "currency": "EUR"}}
    assert iot == {"product": {"id": 7}, "stock": {"available": 12}}


def test_profiles_reshape_a_proxied_json_answer(gateway, start_upstream):
    items = {"items": [{"id": 1, "name": "a", "secret": "s1"}, {"id": 2, "name": "b", "secret": "s2"}],
             "total": 2, "debug": {"host": "db1"}}
    upstream = start_upstream(RecordingUpstream(lambda req: Reply(
        200, [("Content-Type", "application/json; charset=utf-8"), ("X-Upstream", "1")],
        json.dumps(items).encode()) if req.path == "/items" else Reply(
        200, [("Content-Type", "text/plain")], b"plain text stays")))
    config = gateway_config({"up": {"targets": [{"address": f"{HOST}:{upstream.port}"}]}},
                            [route("items", ["/**"], "up", response_headers={"set": {"x-shaped": "yes"}},
                                   profiles={"mobile": {"allow": ["items.id", "items.name", "total"]},
                                             "iot": {"deny": ["debug", "items.secret"],
                                                     "rename": {"total": "count"}}})]) | PROFILES
    gw = gateway(config)
    web = gw.request("GET", "/items")
    mobile = gw.request("GET", "/items", headers={"User-Agent": "Android 14"})
    iot = gw.request("GET", "/items", headers={"X-Device-Class": "iot"})
    assert web.json() == items
    assert mobile.json() == {"items": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}], "total": 2}
    assert iot.json() == {"items": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}], "count": 2}
    for resp in (mobile, iot):
        assert int(resp.header("content-length")) == len(resp.body)
        assert resp.header("x-upstream") == "1" and resp.header("x-shaped") == "yes"
    plain = gw.request("GET", "/other", headers={"User-Agent": "Android 14"})
    assert plain.body == b"plain text stays"                  # not JSON: passed through as is


def test_invalid_aggregate_config_names_the_key(tmp_path):
    config = gateway_config({"catalog": {"targets": [{"address": f"{HOST}:1"}]}},
                            [route("p", ["/p/{id}"], aggregate={"backends": [
                                {"service": "catalog", "path": "/c/{missing.sku}", "into": "c"}]})])
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(config))
    out = subprocess.run([sys.executable, "-m", "fastgw", "check", "-c", str(path)],
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert "routes[0].aggregate.backends[0].path" in out.stdout + out.stderr
    assert "no backend has into: missing" in out.stdout + out.stderr


def test_backend_calls_carry_each_callers_address(gateway, shop):
    """Internal connections are reused across callers: the address travels with each call."""
    catalog, pricing, stock = shop
    gw = gateway(product_page(*shop))
    for source in ("127.0.0.5", "127.0.0.6", "127.0.0.5"):
        with socket.create_connection((HOST, gw.port), source_address=(source, 0)) as sock:
            sock.sendall(b"GET /products/7 HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert [r.header("x-forwarded-for") for r in catalog.requests] == ["127.0.0.5", "127.0.0.6", "127.0.0.5"]
    assert all(r.header("x-fastgw-client-ip") is None for r in catalog.requests + pricing.requests)


def test_aggregation_keeps_working_across_reloads(gateway, shop):
    catalog, pricing, stock = shop
    config = product_page(*shop)
    config["admin"] = {"bind": f"{HOST}:{free_port()}"}
    gw = gateway(config)
    assert gw.request("GET", "/products/7").status == 200
    for _ in range(2):                     # the old config's idle internal connections are closed
        assert gw.admin("POST", "/reload").status == 200
        assert gw.request("GET", "/products/7").json()["price"]["currency"] == "EUR"
    assert len(pricing.requests) == 3
