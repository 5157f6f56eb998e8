"""fastgw.handlers.grpc against a real grpc.aio server (tests/grpc_fixtures.py), every call made on
a uvloop event loop, as in the gateway's workers."""
from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest
import uvloop
from google.protobuf import descriptor_pb2

from fastgw.handlers.grpc import Descriptors, GrpcAnswer, GrpcClient, GrpcConfigError, HttpRule
from grpc_fixtures import build_descriptors, build_inventory_descriptors, free_port, running_inventory_server

GET_ITEM = "shop.v1.Inventory/GetItem"


@pytest.fixture(scope="module")
def pb_path(tmp_path_factory):
    return build_inventory_descriptors(tmp_path_factory.mktemp("grpc"))


@pytest.fixture(scope="module")
def server(pb_path):
    with running_inventory_server(pb_path) as inventory:
        yield inventory


@pytest.fixture(scope="module")
def descriptors(pb_path):
    return Descriptors(pb_path)


@pytest.fixture(scope="module")
def runner():
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        yield r


@pytest.fixture(scope="module")
def client(descriptors, runner):
    c = GrpcClient(descriptors)
    yield c
    runner.run(c.close())


@pytest.fixture
def call(server, descriptors, client, runner):
    """call(method, **kwargs) -> GrpcAnswer: one client.call to the server, on the uvloop runner."""
    def call(method: str, *, address: str | None = None, **kwargs) -> GrpcAnswer:
        args = dict(body=b"", body_field=None, path_params={}, query="", headers=[], timeout=5.0)
        args.update(kwargs)
        return runner.run(client.call(address or server.address, descriptors.method(method), **args))
    return call


def body(answer: GrpcAnswer):
    assert answer.stream is None
    return json.loads(answer.body)


def lines(runner, answer: GrpcAnswer) -> list:
    async def collect():
        return [line async for line in answer.stream]
    raw = runner.run(collect())
    assert all(line.endswith(b"\n") and line.count(b"\n") == 1 for line in raw)
    return [json.loads(line) for line in raw]


def test_runs_on_uvloop_and_reuses_one_channel_per_address(runner, call, client, server):
    assert isinstance(runner.get_loop(), uvloop.Loop)
    assert call(GET_ITEM, path_params={"sku": "abc"}).status == 200
    channel = client._channels[server.address]
    assert call(GET_ITEM, path_params={"sku": "abc"}).status == 200
    assert client._channels == {server.address: channel}
    assert client._loop is runner.get_loop()  # the channel lives on the uvloop loop


def test_get_with_path_param_and_query_uses_the_proto3_json_mapping(call):
    answer = call(GET_ITEM, path_params={"sku": "abc"}, query="with_history=true")
    assert answer.status == 200
    assert ("content-type", "application/json") in answer.headers
    # lowerCamelCase names, int64 as strings, enums by name, default-valued fields left out
    assert body(answer) == {"sku": "abc", "name": "Widget", "available": 7, "totalSold": "12345678901234",
                            "tags": ["blue", "history"], "price": {"currency": "EUR", "units": "1999"},
                            "status": "IN_STOCK"}
    assert body(call(GET_ITEM, path_params={"sku": "abc"}, query="withHistory=0"))["tags"] == ["blue"]


def test_query_sets_dotted_and_repeated_fields_and_ignores_unknown_keys(call):
    answer = call("shop.v1.Inventory/CreateItem",
                  query="item.sku=q1&item.totalSold=5&item.status=DISCONTINUED&item.tags=a&item.tags=b"
                        "&item.price.units=3&utm_source=x&item.nope=1")
    assert answer.status == 200, answer.body
    assert body(answer) == {"sku": "q1", "totalSold": "5", "status": "DISCONTINUED", "tags": ["a", "b"],
                            "price": {"units": "3"}}


def test_body_star_is_the_whole_request_and_the_query_is_ignored(call):
    item = {"sku": "star", "name": "Star", "totalSold": "9007199254740993", "status": "IN_STOCK"}
    answer = call("shop.v1.Inventory/CreateItem", body=json.dumps({"item": item}).encode(), body_field="*",
                  query="item.name=ignored")
    assert answer.status == 200, answer.body
    assert body(answer) == item


def test_body_field_fills_that_field(call):
    answer = call("shop.v1.Inventory/CreateItem", body=b'{"sku": "bf", "available": 2, "tags": ["x"], '
                  b'"price": {"currency": "USD", "units": 5}, "total_sold": 1}', body_field="item")
    assert answer.status == 200, answer.body
    assert body(answer) == {"sku": "bf", "available": 2, "tags": ["x"], "price": {"currency": "USD", "units": "5"},
                            "totalSold": "1"}


def test_dotted_path_param_goes_into_item_sku_and_wins_over_the_body(call):
    assert call("shop.v1.Inventory/CreateItem", body=b'{"sku": "upd"}', body_field="item").status == 200
    answer = call("shop.v1.Inventory/UpdateItem", path_params={"item.sku": "upd"}, body_field="item",
                  body=b'{"sku": "other", "name": "Renamed"}')
    assert answer.status == 200, answer.body
    assert body(answer) == {"sku": "upd", "name": "Renamed"}
    assert body(call(GET_ITEM, path_params={"sku": "upd"}))["name"] == "Renamed"


def test_server_streaming_as_a_json_array(call):
    answer = call("shop.v1.Inventory/ListItems", query="limit=3&tags=a&tags=b")
    assert answer.status == 200
    assert [(i["sku"], i.get("available", 0), i["tags"]) for i in body(answer)] == \
        [("item-0", 0, ["a", "b"]), ("item-1", 1, ["a", "b"]), ("item-2", 2, ["a", "b"])]
    assert body(call("shop.v1.Inventory/ListItems", query="limit=0")) == []
    failed = call("shop.v1.Inventory/ListItems", query="limit=-2")  # the array form cannot stream a failure
    assert failed.status == 409 and body(failed)["error"]["code"] == "grpc_aborted"


def test_server_streaming_as_ndjson(call, runner):
    answer = call("shop.v1.Inventory/ListItems", query="limit=3", stream_format="ndjson")
    assert answer.status == 200 and answer.body == b""
    assert ("content-type", "application/x-ndjson") in answer.headers
    assert [i["sku"] for i in lines(runner, answer)] == ["item-0", "item-1", "item-2"]


def test_ndjson_stream_failing_midway_ends_with_an_error_line(call, runner):
    answer = call("shop.v1.Inventory/ListItems", query="limit=-2", stream_format="ndjson")
    assert answer.status == 200
    got = lines(runner, answer)
    assert [i.get("sku") for i in got[:2]] == ["item-0", "item-1"]
    assert got[2:] == [{"error": {"status": 409, "code": "grpc_aborted", "message": "stream broke", "grpc_status": 10}}]


def test_ndjson_consumer_stopping_early_ends_the_call(call, runner):
    answer = call("shop.v1.Inventory/ListItems", query="limit=100000", stream_format="ndjson")

    async def first_then_close():
        line = await answer.stream.__anext__()
        await answer.stream.aclose()
        return line
    assert json.loads(runner.run(first_then_close()))["sku"] == "item-0"


@pytest.mark.parametrize("code,http", [
    (grpc.StatusCode.CANCELLED, 499), (grpc.StatusCode.UNKNOWN, 500), (grpc.StatusCode.INVALID_ARGUMENT, 400),
    (grpc.StatusCode.DEADLINE_EXCEEDED, 504), (grpc.StatusCode.NOT_FOUND, 404),
    (grpc.StatusCode.ALREADY_EXISTS, 409), (grpc.StatusCode.PERMISSION_DENIED, 403),
    (grpc.StatusCode.UNAUTHENTICATED, 401), (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    (grpc.StatusCode.FAILED_PRECONDITION, 400), (grpc.StatusCode.ABORTED, 409),
    (grpc.StatusCode.OUT_OF_RANGE, 400), (grpc.StatusCode.UNIMPLEMENTED, 501), (grpc.StatusCode.INTERNAL, 500),
    (grpc.StatusCode.UNAVAILABLE, 503), (grpc.StatusCode.DATA_LOSS, 500),
])
def test_grpc_status_maps_to_http_status(call, code, http):
    answer = call("shop.v1.Inventory/Fail", body=json.dumps({"code": code.value[0], "message": "nope é"}).encode(),
                  body_field="*")
    assert answer.status == http
    assert ("grpc-status", str(code.value[0])) in answer.headers
    assert body(answer) == {"error": {"status": http, "code": f"grpc_{code.name.lower()}", "message": "nope é",
                                      "grpc_status": code.value[0]}}


def test_response_body_selects_one_field(call):
    def get(sku: str, field: str):
        answer = call(GET_ITEM, path_params={"sku": sku}, response_body=field)
        assert answer.status == 200, answer.body
        return body(answer)
    assert call("shop.v1.Inventory/CreateItem", body=b'{"sku": "bare"}', body_field="item").status == 200
    assert (get("abc", "tags"), get("abc", "price"), get("abc", "total_sold"), get("abc", "status")) == \
        (["blue"], {"currency": "EUR", "units": "1999"}, "12345678901234", "IN_STOCK")
    # default-valued fields are still a body
    assert (get("bare", "tags"), get("bare", "price"), get("bare", "available"), get("bare", "name")) == \
        ([], {}, 0, "")


def test_not_found_from_the_service(call):
    answer = call(GET_ITEM, path_params={"sku": "missing"})
    assert (answer.status, body(answer)["error"]["message"]) == (404, "no item 'missing'")


def test_a_closed_port_is_503_unavailable(call):
    address = f"127.0.0.1:{free_port()}"
    answer = call(GET_ITEM, address=address, path_params={"sku": "abc"})
    assert answer.status == 503 and body(answer)["error"]["code"] == "grpc_unavailable"
    streamed = call("shop.v1.Inventory/ListItems", address=address, stream_format="ndjson")
    assert streamed.status == 503 and streamed.stream is None


def test_deadline_exceeded_is_504_after_about_the_timeout(call):
    started = time.monotonic()
    answer = call("shop.v1.Inventory/Slow", query="ms=3000", timeout=0.3)
    elapsed = time.monotonic() - started
    assert answer.status == 504 and body(answer)["error"]["code"] == "grpc_deadline_exceeded"
    assert 0.25 < elapsed < 1.5
    assert call("shop.v1.Inventory/Slow", query="ms=10", timeout=2).status == 200


def test_only_allow_listed_headers_become_metadata(call):
    headers = [("X-Request-ID", "r-1"), ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
               ("Authorization", "Bearer t"), ("x-consumer-name", "alice"), ("Cookie", "c=1"),
               ("Connection", "keep-alive"), ("x-secret", "s"), ("tracestate", "non-ascii-é")]
    answer = call("shop.v1.Inventory/Whoami", headers=headers, response_body="metadata")
    assert answer.status == 200
    metadata = body(answer)  # response_body: the map itself
    sent = {k: v for k, v in metadata.items() if not k.startswith(("grpc-", "user-agent", ":"))}
    assert sent == {"x-request-id": "r-1", "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                    "authorization": "Bearer t", "x-consumer-name": "alice"}


def test_custom_allow_list(server, descriptors, runner):
    async def whoami():
        client = GrpcClient(descriptors, metadata_headers=frozenset({"X-Secret"}))
        try:
            return await client.call(server.address, descriptors.method("shop.v1.Inventory/Whoami"), body=b"",
                                     body_field=None, path_params={"path": "a/b"}, query="",
                                     headers=[("x-secret", "s"), ("x-request-id", "r")], timeout=5)
        finally:
            await client.close()
    reply = body(runner.run(whoami()))
    assert reply["path"] == "a/b" and reply["metadata"]["x-secret"] == "s" and "x-request-id" not in reply["metadata"]
    for bad in ("connection", "grpc-timeout", "trace-bin", ":authority", "te"):
        with pytest.raises(GrpcConfigError, match="cannot be passed as gRPC metadata"):
            GrpcClient(descriptors, metadata_headers=frozenset({bad}))


@pytest.mark.parametrize("method,kwargs,message", [
    ("CreateItem", dict(body=b'{"item": ', body_field="*"), "invalid JSON body"),
    ("CreateItem", dict(body=b'{"item": {"colour": "red"}}', body_field="*"), 'no field named "colour"'),
    ("CreateItem", dict(body=b'{"colour": "red"}', body_field="item"), 'no field named "colour"'),
    ("CreateItem", dict(body=b'{"item": {"available": "lots"}}', body_field="*"), "available"),
    ("CreateItem", dict(body=b'{"item": {"sku": 5}}', body_field="*"), "sku"),
    ("CreateItem", dict(body=b'["x"]', body_field="*"), "must be a JSON object"),
    ("CreateItem", dict(body=b'"sku"', body_field="item"), "must be a JSON object"),
    ("GetItem", dict(body=b'{"sku": "abc"}', path_params={"sku": "abc"}), "takes no request body"),
    ("GetItem", dict(path_params={"sku": "abc"}, query="with_history=maybe"), "not a boolean"),
    ("ListItems", dict(query="limit=1&limit=2"), "given 2 times"),
    ("ListItems", dict(query="limit=ten"), "limit"),
    ("CreateItem", dict(query="item.status=SOLD_OUT"), "SOLD_OUT"),
])
def test_bad_requests_are_400_and_never_reach_the_server(call, server, method, kwargs, message):
    before = sum(server.calls.values())
    answer = call(f"shop.v1.Inventory/{method}", **kwargs)
    assert answer.status == 400
    error = body(answer)["error"]
    assert (error["code"], error["grpc_status"]) == ("grpc_invalid_argument", 3)
    assert message in error["message"]
    assert sum(server.calls.values()) == before


def test_timeout_must_be_positive(call):
    with pytest.raises(ValueError, match="timeout"):
        call(GET_ITEM, path_params={"sku": "abc"}, timeout=0)


def test_http_rules_in_router_syntax(descriptors):
    assert descriptors.http_rules() == [
        HttpRule("GET", "/v1/items/{sku}", GET_ITEM, None, None, {"sku": "sku"}),
        HttpRule("POST", "/v1/items", "shop.v1.Inventory/CreateItem", "item", None, {}),
        HttpRule("PATCH", "/v1/items/{item__sku}", "shop.v1.Inventory/UpdateItem", "item", None,
                 {"item__sku": "item.sku"}),
        HttpRule("GET", "/v1/items", "shop.v1.Inventory/ListItems", None, None, {}),
        HttpRule("POST", "/v1/fail", "shop.v1.Inventory/Fail", "*", None, {}),
        HttpRule("HEAD", "/v1/whoami", "shop.v1.Inventory/Whoami", None, "metadata", {}),
        HttpRule("GET", "/v1/whoami/{path...}", "shop.v1.Inventory/Whoami", None, None, {"path": "path"}),
        HttpRule("DELETE", "/v1/whoami/{path}/x", "shop.v1.Inventory/Whoami", None, None, {"path": "path"}),
    ]


BAD_PROTO = """\
syntax = "proto3";
package bad.v1;
import "google/api/annotations.proto";
message Req { string name = 1; repeated string names = 2; Inner inner = 3; }
message Inner { string id = 1; }
service Bad {
  rpc Do(Req) returns (Req) { option (google.api.http) = { %s }; }
  rpc Up(stream Req) returns (Req);
}
"""


@pytest.mark.parametrize("annotation,message", [
    ('get: "/v1/{name=shelves/*}"', "variable '{name=shelves/*}' is not supported"),
    ('post: "/v1/{name}:cancel" body: "*"', "':verb' suffix"),
    ('get: "/v1/{name=**}/tail"', "variable '{name=**}' is not supported"),
    ('get: "/v1/*/x"', "segment '*' is not supported"),
    ('get: "/v1/{nope}"', "'nope' is not a singular scalar field of bad.v1.Req"),
    ('get: "/v1/{names}"', "'names' is not a singular scalar field"),
    ('get: "/v1/{inner}"', "'inner' is not a singular scalar field"),
    ('get: "/v1/{name}/{name}"', "appears twice"),
    ('post: "/v1/x" body: "missing"', "body 'missing' is not a field"),
    ('get: "/v1/x" response_body: "missing"', "response_body 'missing' is not a field"),
])
def test_http_rules_reject_what_the_router_cannot_express(tmp_path, annotation, message):
    pb = build_descriptors(tmp_path, {"bad/v1/bad.proto": BAD_PROTO % annotation}, "bad.pb")
    with pytest.raises(GrpcConfigError, match="bad.v1.Bad/Do") as err:
        Descriptors(pb).http_rules()
    assert message in str(err.value) and "bad.pb" in str(err.value)


def test_http_rules_accept_supported_templates(tmp_path):
    pb = build_descriptors(tmp_path, {"bad/v1/bad.proto": BAD_PROTO % 'get: "/v1/{inner.id=*}/{name=**}"'}, "ok.pb")
    assert Descriptors(pb).http_rules() == [
        HttpRule("GET", "/v1/{inner__id}/{name...}", "bad.v1.Bad/Do", None, None,
                 {"inner__id": "inner.id", "name": "name"})]


def test_methods_and_config_errors(descriptors, pb_path, tmp_path):
    method = descriptors.method("/shop.v1.Inventory/ListItems")
    assert (method.name, method.path, method.server_streaming) == \
        ("shop.v1.Inventory/ListItems", "/shop.v1.Inventory/ListItems", True)
    assert method.input.DESCRIPTOR.full_name == "shop.v1.ListItemsRequest"
    assert descriptors.method(GET_ITEM).server_streaming is False
    with pytest.raises(GrpcConfigError, match="'shop.v1.Inventory/Nope' is not in .*inventory.pb"):
        descriptors.method("shop.v1.Inventory/Nope")
    with pytest.raises(GrpcConfigError, match="is not in"):
        descriptors.method("shop.v2.Inventory/GetItem")
    with pytest.raises(GrpcConfigError, match="'shop.v1.Inventory/Upload' .* is client-streaming: only unary"):
        descriptors.method("shop.v1.Inventory/Upload")
    with pytest.raises(GrpcConfigError, match="bidirectional-streaming"):
        descriptors.method("shop.v1.Inventory/Chat")
    with pytest.raises(GrpcConfigError, match="cannot read gRPC descriptors .*missing.pb"):
        Descriptors(str(tmp_path / "missing.pb"))
    (tmp_path / "text.pb").write_text("syntax = 'proto3';\n")
    with pytest.raises(GrpcConfigError, match="text.pb' is not a FileDescriptorSet"):
        Descriptors(str(tmp_path / "text.pb"))
    # a set built without --include_imports: the imports are missing
    fds = descriptor_pb2.FileDescriptorSet.FromString(open(pb_path, "rb").read())
    del fds.file[:-1]
    (tmp_path / "noimports.pb").write_bytes(fds.SerializeToString())
    with pytest.raises(GrpcConfigError, match="imports google/api/annotations.proto, which is not in the set"):
        Descriptors(str(tmp_path / "noimports.pb"))
    broken = descriptor_pb2.FileDescriptorSet()
    broken.file.add(name="x.proto", package="x").message_type.add(name="M").field.add(
        name="a", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE, type_name=".x.Nope")
    (tmp_path / "broken.pb").write_bytes(broken.SerializeToString())
    with pytest.raises(GrpcConfigError, match="broken.pb': invalid x.proto: .*x.Nope"):
        Descriptors(str(tmp_path / "broken.pb"))


def test_close_then_reuse_on_another_uvloop_loop(server, descriptors):
    client = GrpcClient(descriptors)
    method = descriptors.method(GET_ITEM)

    async def get():
        answer = await client.call(server.address, method, body=b"", body_field=None, path_params={"sku": "abc"},
                                   query="", headers=[], timeout=5)
        await client.close()
        return answer.status
    for _ in range(2):  # close() forgets the loop: a new one may use the client
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
            assert r.run(get()) == 200
    assert client._channels == {}
