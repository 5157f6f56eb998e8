"""gRPC test helpers: the shop.v1.Inventory proto, its FileDescriptorSet, a real grpc.aio server.

    pb = build_inventory_descriptors(tmp_path)        # -> ".../inventory.pb" (protoc --include_imports)
    with running_inventory_server(pb) as server:      # grpc.aio server in its own thread + loop
        server.address                                # "127.0.0.1:PORT"
        server.calls                                  # Counter {"GetItem": 1, ...}: RPCs received so far
        server.last_metadata                          # {name: value} of the last RPC's metadata
        server.items                                  # {sku: Item} the server's state
    with running_inventory_server() as server: ...    # the same, with its own set in a temporary dir

`build_descriptors(tmpdir, {"path.proto": source}, "name.pb")` builds a set from any protos (used for
protos with annotations the engine must reject). Nothing here depends on pytest or on fastgw.

Inventory behaviour (items live in the server, seeded with sku "abc"; "missing" is NOT_FOUND):
  GetItem       {sku, with_history}  -> Item (tags gains "history" when with_history)
  CreateItem    {item}               -> the item, stored (ALREADY_EXISTS if the sku exists)
  UpdateItem    {item}               -> the item, stored (NOT_FOUND if the sku does not exist)
  ListItems     {limit, tags}        -> stream of `limit` items (sku "item-<i>", the given tags);
                                        limit < 0: -limit items then ABORTED (a stream failing midway)
  Fail          {code, message}      -> aborts with that grpc status code and message
  Slow          {ms}                 -> sleeps ms, then an Item
  Whoami        {path}               -> MetadataReply{metadata: the call's (non-binary) metadata, path}
  Upload / Chat: client-streaming and bidi, declared only (the engine must refuse them)
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import google.protobuf
import grpc
import grpc_tools
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_tools import protoc

INVENTORY_PROTO_PATH = "shop/v1/inventory.proto"
INVENTORY_PROTO = """\
syntax = "proto3";
package shop.v1;

import "google/api/annotations.proto";

service Inventory {
  rpc GetItem(GetItemRequest) returns (Item) {
    option (google.api.http) = { get: "/v1/items/{sku}" };
  }
  rpc CreateItem(CreateItemRequest) returns (Item) {
    option (google.api.http) = { post: "/v1/items" body: "item" };
  }
  rpc UpdateItem(UpdateItemRequest) returns (Item) {
    option (google.api.http) = { patch: "/v1/items/{item.sku}" body: "item" };
  }
  rpc ListItems(ListItemsRequest) returns (stream Item) {
    option (google.api.http) = { get: "/v1/items" };
  }
  rpc Fail(FailRequest) returns (Item) {
    option (google.api.http) = { post: "/v1/fail" body: "*" };
  }
  rpc Slow(SlowRequest) returns (Item);
  rpc Whoami(WhoamiRequest) returns (MetadataReply) {
    option (google.api.http) = {
      custom: { kind: "HEAD" path: "/v1/whoami" }
      response_body: "metadata"
      additional_bindings { get: "/v1/whoami/{path=**}" }
      additional_bindings { delete: "/v1/whoami/{path=*}/x" }
    };
  }
  rpc Upload(stream Item) returns (Item);
  rpc Chat(stream Item) returns (stream Item);
}

enum Status {
  STATUS_UNSPECIFIED = 0;
  IN_STOCK = 1;
  DISCONTINUED = 2;
}

message Money {
  string currency = 1;
  int64 units = 2;
}

message Item {
  string sku = 1;
  string name = 2;
  int32 available = 3;
  int64 total_sold = 4;
  repeated string tags = 5;
  Money price = 6;
  Status status = 7;
}

message GetItemRequest {
  string sku = 1;
  bool with_history = 2;
}
message CreateItemRequest { Item item = 1; }
message UpdateItemRequest { Item item = 1; }
message ListItemsRequest {
  int32 limit = 1;
  repeated string tags = 2;
}
message FailRequest {
  int32 code = 1;
  string message = 2;
}
message SlowRequest { int32 ms = 1; }
message WhoamiRequest { string path = 1; }
message MetadataReply {
  map<string, string> metadata = 1;
  string path = 2;
}
"""


def _include_dirs() -> list[str]:
    """googleapis-common-protos ships its .proto files inside the installed `google` package; the
    well-known types (descriptor.proto, ...) come with grpc_tools."""
    googleapis_root = Path(next(iter(google.__path__))).parent  # site-packages: has google/api/*.proto
    return [str(googleapis_root), os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")]


def build_descriptors(tmpdir: str | os.PathLike, protos: dict[str, str], name: str) -> str:
    """Write `protos` ({relative path: source}) under tmpdir/src and compile them into a
    FileDescriptorSet tmpdir/<name> (with imports); returns its path."""
    src = Path(tmpdir) / "src"
    for rel, text in protos.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    out = Path(tmpdir) / name
    args = ["protoc", f"-I{src}", *(f"-I{d}" for d in _include_dirs()),
            "--include_imports", f"--descriptor_set_out={out}", *protos]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {list(protos)}")
    return str(out)


def build_inventory_descriptors(tmpdir: str | os.PathLike) -> str:
    return build_descriptors(tmpdir, {INVENTORY_PROTO_PATH: INVENTORY_PROTO}, "inventory.pb")


def _message_classes(pb_path: str) -> dict[str, type]:
    """shop.v1 message classes from the set, in a private pool (independent of the engine's code)."""
    fds = descriptor_pb2.FileDescriptorSet.FromString(Path(pb_path).read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for file in fds.file:  # --include_imports lists dependencies first
        pool.Add(file)
    file = pool.FindFileByName(INVENTORY_PROTO_PATH)
    return {n: message_factory.GetMessageClass(d) for n, d in file.message_types_by_name.items()}


class InventoryServer:
    """The shop.v1.Inventory servicer; state is touched only from the server's loop thread."""

    def __init__(self, pb_path: str) -> None:
        self.m = _message_classes(pb_path)
        self.address = ""
        self.calls: Counter[str] = Counter()
        self.last_metadata: dict[str, str] = {}
        price = self.m["Money"](currency="EUR", units=1999)
        self.items = {"abc": self.m["Item"](sku="abc", name="Widget", available=7, total_sold=12345678901234,
                                            tags=["blue"], price=price, status=1)}

    def _seen(self, name: str, context: grpc.aio.ServicerContext) -> None:
        self.calls[name] += 1
        self.last_metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}

    async def GetItem(self, req, context):
        self._seen("GetItem", context)
        if req.sku not in self.items:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no item {req.sku!r}")
        item = self.m["Item"]()
        item.CopyFrom(self.items[req.sku])
        if req.with_history:
            item.tags.append("history")
        return item

    async def CreateItem(self, req, context):
        self._seen("CreateItem", context)
        if req.item.sku in self.items:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"item {req.item.sku!r} exists")
        self.items[req.item.sku] = req.item
        return req.item

    async def UpdateItem(self, req, context):
        self._seen("UpdateItem", context)
        if req.item.sku not in self.items:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no item {req.item.sku!r}")
        self.items[req.item.sku] = req.item
        return req.item

    async def ListItems(self, req, context):
        self._seen("ListItems", context)
        for i in range(abs(req.limit)):
            yield self.m["Item"](sku=f"item-{i}", available=i, tags=req.tags)
        if req.limit < 0:
            await context.abort(grpc.StatusCode.ABORTED, "stream broke")

    async def Fail(self, req, context):
        self._seen("Fail", context)
        await context.abort(grpc.StatusCode(next(c.value for c in grpc.StatusCode if c.value[0] == req.code)),
                            req.message)

    async def Slow(self, req, context):
        self._seen("Slow", context)
        await asyncio.sleep(req.ms / 1000)
        return self.m["Item"](sku="slow")

    async def Whoami(self, req, context):
        self._seen("Whoami", context)
        return self.m["MetadataReply"](metadata=self.last_metadata, path=req.path)

    def handler(self) -> grpc.GenericRpcHandler:
        m = self.m
        unary = {"GetItem": "GetItemRequest", "CreateItem": "CreateItemRequest",
                 "UpdateItem": "UpdateItemRequest", "Fail": "FailRequest", "Slow": "SlowRequest",
                 "Whoami": "WhoamiRequest"}
        handlers = {name: grpc.unary_unary_rpc_method_handler(
            getattr(self, name), request_deserializer=m[req].FromString,
            response_serializer=lambda msg: msg.SerializeToString()) for name, req in unary.items()}
        handlers["ListItems"] = grpc.unary_stream_rpc_method_handler(
            self.ListItems, request_deserializer=m["ListItemsRequest"].FromString,
            response_serializer=lambda msg: msg.SerializeToString())
        return grpc.method_handlers_generic_handler("shop.v1.Inventory", handlers)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_inventory_server(pb_path: str | None = None) -> Iterator[InventoryServer]:
    """A grpc.aio server for shop.v1.Inventory on 127.0.0.1:<free port>, run by a thread with its
    own (plain asyncio) event loop, so the test side may use any loop; stopped on exit."""
    if pb_path is None:
        with tempfile.TemporaryDirectory() as tmp, running_inventory_server(build_inventory_descriptors(tmp)) as s:
            yield s
        return
    inventory = InventoryServer(pb_path)
    started, stop = threading.Event(), None
    errors: list[BaseException] = []

    async def serve() -> None:
        nonlocal stop
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((inventory.handler(),))
        port = server.add_insecure_port("127.0.0.1:0")
        inventory.address = f"127.0.0.1:{port}"
        await server.start()
        stop = asyncio.Event()
        started.set()
        await stop.wait()
        await server.stop(grace=0.2)

    def run() -> None:
        try:
            loop.run_until_complete(serve())
        except BaseException as exc:  # surfaced to the test thread below
            errors.append(exc)
            started.set()

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=run, name="grpc-inventory", daemon=True)
    thread.start()
    started.wait(10)
    if errors or stop is None:
        raise RuntimeError(f"inventory server did not start: {errors}")
    try:
        yield inventory
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()
