"""HTTP/JSON -> gRPC through the gateway's socket: a real grpc.aio server (tests/grpc_fixtures.py),
descriptors built at test time with grpcio-tools, routes by method name and by google.api.http
annotations."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import yaml

from grpc_fixtures import build_inventory_descriptors, running_inventory_server
from upstreams import HOST, free_port, gateway_config, route


@pytest.fixture(scope="module")
def descriptors(tmp_path_factory):
    return build_inventory_descriptors(tmp_path_factory.mktemp("protos"))


@pytest.fixture
def inventory(descriptors):
    with running_inventory_server(descriptors) as server:
        yield server


def grpc_config(address: str, descriptors: str, *routes) -> dict:
    return gateway_config({"inventory": {"scheme": "grpc", "targets": [{"address": address}],
                                         "grpc": {"descriptors": descriptors}}}, list(routes))


def test_named_method_with_path_and_query(gateway, inventory, descriptors):
    gw = gateway(grpc_config(inventory.address, descriptors,
                             route("inventory-json", ["/inventory/{sku}"], methods=["GET"],
                                   grpc={"service": "inventory", "method": "shop.v1.Inventory/GetItem"})))
    resp = gw.request("GET", "/inventory/abc?with_history=true",
                      headers={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
    assert resp.status == 200, resp.body
    item = resp.json()
    # proto3 JSON mapping: lowerCamelCase names, int64 as a string, enums by name
    assert item["sku"] == "abc" and item["name"] == "Widget" and item["totalSold"] == "12345678901234"
    assert "history" in item["tags"] and resp.header("content-type") == "application/json"
    # Tracing and the request id travel as metadata; the deadline is always set.
    meta = inventory.last_metadata
    assert meta["x-request-id"] == resp.header("x-request-id")
    assert meta["traceparent"].startswith("00-0af7651916cd43dd8448eb211c80319c-")
    assert gw.request("GET", "/inventory/missing").status == 404
    error = gw.request("GET", "/inventory/missing").json()["error"]
    assert error["code"] == "grpc_not_found" and error["request_id"]


def test_annotations_route_every_method(gateway, inventory, descriptors):
    gw = gateway(grpc_config(inventory.address, descriptors, route("shop", grpc={"service": "inventory"})
                             | {"match": {}}))
    assert gw.request("GET", "/v1/items/abc").json()["name"] == "Widget"
    created = gw.request("POST", "/v1/items", body=json.dumps({"sku": "new-1", "name": "Lamp",
                                                               "price": {"currency": "EUR", "units": 12}}).encode(),
                         headers={"Content-Type": "application/json"})
    assert created.status == 200, created.body
    assert created.json()["price"] == {"currency": "EUR", "units": "12"}
    patched = gw.request("PATCH", "/v1/items/new-1", body=json.dumps({"name": "Desk lamp"}).encode())
    assert patched.status == 200 and patched.json()["sku"] == "new-1", patched.body   # {item.sku} from the path
    assert gw.request("GET", "/v1/items/new-1").json()["name"] == "Desk lamp"
    listed = gw.request("GET", "/v1/items?limit=3&tags=red&tags=big")
    assert [i["sku"] for i in listed.json()] == ["item-0", "item-1", "item-2"]   # server stream -> array
    assert listed.json()[0]["tags"] == ["red", "big"]
    # Wrong method on an annotated path: no route.
    assert gw.request("DELETE", "/v1/items/abc").status == 404
    bad = gw.request("POST", "/v1/items", body=b'{"item": {"unknownField": 1}}')
    assert bad.status == 400 and bad.json()["error"]["code"] == "grpc_invalid_argument"


def test_grpc_status_maps_to_http_status(gateway, inventory, descriptors):
    gw = gateway(grpc_config(inventory.address, descriptors, route("shop", grpc={"service": "inventory"})
                             | {"match": {}}))
    for code, status in [(5, 404), (3, 400), (7, 403), (16, 401), (8, 429), (14, 503), (12, 501), (13, 500)]:
        resp = gw.request("POST", "/v1/fail", body=json.dumps({"code": code, "message": "no"}).encode())
        assert resp.status == status, (code, resp.body)
        assert resp.json()["error"]["grpc_status"] == code


def test_server_streaming_as_ndjson_arrives_line_by_line(gateway, inventory, descriptors):
    gw = gateway(grpc_config(inventory.address, descriptors,
                             route("stream", ["/list"], grpc={"service": "inventory", "stream": "ndjson",
                                                             "method": "shop.v1.Inventory/ListItems"})))
    resp = gw.request("GET", "/list?limit=4")
    assert resp.status == 200 and resp.header("content-type") == "application/x-ndjson"
    assert resp.header("transfer-encoding") == "chunked"
    assert [json.loads(line)["sku"] for line in resp.body.splitlines()] == [f"item-{i}" for i in range(4)]
    # A stream that fails midway ends with an error line (the status was already sent).
    broken = gw.request("GET", "/list?limit=-2")
    lines = [json.loads(line) for line in broken.body.splitlines()]
    assert broken.status == 200 and [line.get("sku") for line in lines[:2]] == ["item-0", "item-1"]
    assert lines[-1]["error"]["code"] == "grpc_aborted"


def test_route_timeout_is_the_deadline(gateway, inventory, descriptors):
    gw = gateway(grpc_config(inventory.address, descriptors,
                             route("slow", ["/slow"], timeout="300ms",
                                   grpc={"service": "inventory", "method": "shop.v1.Inventory/Slow"})))
    started = time.monotonic()
    resp = gw.request("POST", "/slow", body=b'{"ms": 3000}')
    assert resp.status == 504 and resp.json()["error"]["code"] == "grpc_deadline_exceeded"
    assert time.monotonic() - started < 1.5
    assert gw.request("POST", "/slow", body=b'{"ms": 10}').status == 200


def test_metadata_allow_list(gateway, inventory, descriptors):
    gw = gateway(grpc_config(inventory.address, descriptors,
                             route("who", ["/who/{path}"], grpc={"service": "inventory", "metadata": ["x-tenant"],
                                                                 "method": "shop.v1.Inventory/Whoami"})))
    resp = gw.request("GET", "/who/p1", headers={"X-Tenant": "t1", "X-Secret": "s", "Authorization": "Bearer t"})
    assert resp.status == 200, resp.body
    meta = inventory.last_metadata
    assert meta["x-tenant"] == "t1" and meta["authorization"] == "Bearer t"
    assert "x-secret" not in meta


def test_unreachable_target_is_503(gateway, descriptors):
    gw = gateway(grpc_config(f"{HOST}:{free_port()}", descriptors,
                             route("i", ["/i/{sku}"], grpc={"service": "inventory",
                                                            "method": "shop.v1.Inventory/GetItem"})))
    resp = gw.request("GET", "/i/abc")
    assert resp.status == 503, resp.body


def test_config_errors_name_the_key(tmp_path, descriptors):
    def check(config):
        path = tmp_path / "gw.yaml"
        path.write_text(yaml.safe_dump(config))
        out = subprocess.run([sys.executable, "-m", "fastgw", "check", "-c", str(path)],
                             capture_output=True, text=True)
        return out.returncode, out.stdout + out.stderr
    code, text = check(grpc_config(f"{HOST}:1", descriptors,
                                   route("i", ["/i"], grpc={"service": "inventory", "method": "shop.v1.Inventory/Nope"})))
    assert code != 0 and "routes[0].grpc" in text and "Nope" in text, text
    code, text = check(grpc_config(f"{HOST}:1", str(tmp_path / "missing.pb"),
                                   route("i", ["/i"], grpc={"service": "inventory", "method": "shop.v1.Inventory/GetItem"})))
    assert code != 0 and "missing.pb" in text, text
    code, text = check(grpc_config(f"{HOST}:1", descriptors,
                                   route("i", ["/i"], grpc={"service": "inventory", "method": "shop.v1.Inventory/Upload"})))
    assert code != 0 and "stream" in text.lower(), text


def test_failing_target_is_ejected_like_a_proxied_one(gateway, inventory, descriptors):
    config = grpc_config(inventory.address, descriptors,
                         route("i", ["/i/{sku}"], grpc={"service": "inventory", "method": "shop.v1.Inventory/GetItem"}))
    dead = f"{HOST}:{free_port()}"
    config["services"]["inventory"].update(
        targets=[{"address": dead}, {"address": inventory.address}], balance={"algorithm": "round_robin"},
        health={"passive": {"consecutive_failures": 2, "ejection_time": "30s"}})
    config["admin"] = {"bind": f"{HOST}:{free_port()}"}
    gw = gateway(config)
    statuses = [gw.request("GET", "/i/abc").status for _ in range(12)]
    assert statuses.count(503) == 2 and statuses[-6:] == [200] * 6, statuses
    health = {t["address"]: t for t in gw.admin("GET", "/services/inventory/health").json()["targets"]}
    assert health[dead]["ejected"] and not health[inventory.address]["ejected"]
    assert health[inventory.address]["ewma_ms"] > 0                # gRPC calls feed the latency EWMA
