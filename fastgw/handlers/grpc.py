"""HTTP/JSON -> gRPC transcoding: descriptors, google.api.http rules, and a grpc.aio client.

    descriptors = Descriptors("protos/inventory.pb")      # protoc --include_imports --descriptor_set_out
    rules = descriptors.http_rules()                      # google.api.http annotations as router patterns
    client = GrpcClient(descriptors)
    answer = await client.call("127.0.0.1:50051", descriptors.method("shop.v1.Inventory/GetItem"),
                               body=b"", body_field=None, path_params={"sku": "abc"}, query="",
                               headers=[...], timeout=5.0)

Choices (where the proto3 JSON mapping / google.api.http leave room):
- The request is assembled from the JSON body, then the query, then the path parameters (a path
  value wins). With body "*" the query is ignored (every field not in the path is in the body); with
  a body field, query keys for that field are ignored. Query keys are proto or lowerCamelCase names,
  dotted for nested fields (`b.c=x`); a repeated key fills a repeated field (a non-repeated field
  given twice is a 400); bools accept true/false/1/0/t/f. Keys naming no field are ignored, as
  grpc-gateway does: they may be meant for something else on the way (a plugin, a cache buster).
- Unknown JSON body fields, invalid JSON, wrong types: 400 (`grpc_invalid_argument`).
- Responses use the proto3 JSON mapping defaults: lowerCamelCase names, enums by name, 64-bit
  integers as strings, default-valued fields omitted.
- Server streaming as "ndjson": the first message (or the error) is awaited before answering, so the
  HTTP status is the real one; a later failure becomes a final `{"error": ...}` line.
- grpc.aio runs on the worker's uvloop loop directly (tests/test_grpc_transcode.py runs every call on
  uvloop.new_event_loop()): no thread-pool fallback was needed. A GrpcClient belongs to the loop
  that first used it. Channels are plaintext (h2c).
- google.api.http is read by re-parsing the method options' bytes as
  descriptor_pb2.MethodOptions with google.api.annotations_pb2 imported, which registers the
  extension in the default pool (see Descriptors._http_options).
"""
from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import grpc
import msgspec
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import DecodeError, Message

DEFAULT_METADATA = frozenset({"traceparent", "tracestate", "x-request-id", "authorization", "x-consumer-name"})
# Never sent as metadata whatever the allow-list says: they describe the HTTP/1.1 connection or
# the body, or gRPC owns them (content-type, te, grpc-*, pseudo headers, binary -bin values).
_NEVER_FORWARDED = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
                              "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade",
                              "host", "content-length", "content-type"})
_METADATA_NAME = re.compile(r"^[0-9a-z_.-]+$")

# The HTTP mapping google/rpc/code.proto documents for each code.
_HTTP_STATUS = {grpc.StatusCode[name]: status for name, status in dict(
    OK=200, CANCELLED=499, UNKNOWN=500, INVALID_ARGUMENT=400, DEADLINE_EXCEEDED=504, NOT_FOUND=404,
    ALREADY_EXISTS=409, PERMISSION_DENIED=403, UNAUTHENTICATED=401, RESOURCE_EXHAUSTED=429,
    FAILED_PRECONDITION=400, ABORTED=409, OUT_OF_RANGE=400, UNIMPLEMENTED=501, INTERNAL=500,
    UNAVAILABLE=503, DATA_LOSS=500).items()}

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_VARIABLE = re.compile(rf"^\{{({_IDENT}(?:\.{_IDENT})*)(?:=([^{{}}]*))?\}}$")
# MessageToDict raises TypeError for an Any whose type is not in the descriptors.
_JSON_ERRORS = (json_format.SerializeToJsonError, TypeError)
_BOOLS = {"true": True, "t": True, "1": True, "false": False, "f": False, "0": False}


class GrpcConfigError(ValueError):
    """Descriptors, methods or annotations the gateway cannot use (reported at config load)."""


class _BadRequest(Exception):
    """The HTTP request cannot become the gRPC request: a 400."""


@dataclass(frozen=True)
class HttpRule:
    http_method: str           # "GET", ... or a custom kind, upper case
    pattern: str               # router syntax: literals, {name}, a last {name...}
    grpc_method: str           # "package.Service/Method"
    body: str | None           # "*", a request field name, or None (no body)
    response_body: str | None  # a response field name sent instead of the whole message
    params: dict[str, str]     # router param name -> request field path ("item__sku" -> "item.sku")


@dataclass
class GrpcAnswer:
    status: int                                  # HTTP status
    headers: list[tuple[str, str]]               # content-type; grpc-status on errors
    body: bytes = b""                            # the whole body, or b"" when `stream` is set
    stream: AsyncIterator[bytes] | None = None   # ndjson server streaming: encoded lines


@dataclass(frozen=True)
class Method:
    """One unary or server-streaming RPC."""
    name: str                 # "shop.v1.Inventory/GetItem"
    path: str                 # "/shop.v1.Inventory/GetItem", the call's HTTP/2 :path
    input: type[Message]
    output: type[Message]
    server_streaming: bool
    descriptor: MethodDescriptor


def _resolve(desc: Descriptor, path: str) -> list[FieldDescriptor] | None:
    """The fields along a dotted path of proto or JSON names; None if a name is unknown or a step
    before the last is not a singular message."""
    chain: list[FieldDescriptor] = []
    for name in path.split("."):
        if chain:
            if chain[-1].message_type is None or chain[-1].is_repeated:
                return None
            desc = chain[-1].message_type
        field = desc.fields_by_name.get(name) or next((f for f in desc.fields if f.json_name == name), None)
        if field is None:
            return None
        chain.append(field)
    return chain


def _is_plain_message(field: FieldDescriptor) -> bool:
    """A message field whose JSON form is an object (well-known types have their own forms)."""
    return field.message_type is not None and not field.message_type.full_name.startswith("google.protobuf.")


def _translate(template: str, where: str) -> tuple[str, dict[str, str]]:
    """A google.api.http path template -> (router pattern, {param name: field path})."""
    if not template.startswith("/"):
        raise GrpcConfigError(f"{where}: the path must start with '/'")
    segments = re.split(r"/(?![^{]*\})", template[1:])  # a '/' inside {...} does not split
    if ":" in re.sub(r"\{[^}]*\}", "", segments[-1]):
        raise GrpcConfigError(f"{where}: a ':verb' suffix cannot be expressed as a route pattern")
    out: list[str] = []
    params: dict[str, str] = {}
    for i, segment in enumerate(segments):
        m = _VARIABLE.match(segment)
        if m is None:
            if re.search(r"[{}*]", segment) or (not segment and template != "/"):
                raise GrpcConfigError(f"{where}: segment {segment!r} is not supported (a segment is "
                                      "literal text or a whole variable: {field}, {field=*}, {field=**})")
            out.append(segment)
            continue
        field_path, sub = m.group(1), m.group(2)
        name = field_path.replace(".", "__")  # router param names cannot contain '.'
        if sub in (None, "*"):
            out.append(f"{{{name}}}")
        elif sub == "**" and i == len(segments) - 1:
            out.append(f"{{{name}...}}")
        else:
            raise GrpcConfigError(f"{where}: variable {segment!r} is not supported (only {{field}}, "
                                  "{field=*} and, last, {field=**}: no literals or wildcards inside)")
        if name in params:
            raise GrpcConfigError(f"{where}: field {field_path!r} appears twice")
        params[name] = field_path
    return "/" + "/".join(out), params


class Descriptors:
    """A FileDescriptorSet loaded into its own DescriptorPool."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                files = list(descriptor_pb2.FileDescriptorSet.FromString(f.read()).file)
        except OSError as exc:
            raise GrpcConfigError(f"cannot read gRPC descriptors {path!r}: {exc.strerror}") from None
        except DecodeError:
            raise GrpcConfigError(f"{path!r} is not a FileDescriptorSet (build it with protoc "
                                  "--include_imports --descriptor_set_out=...)") from None
        if not files:
            raise GrpcConfigError(f"{path!r} describes no .proto files")
        self.pool = descriptor_pool.DescriptorPool()
        self._file_names = [f.name for f in files]
        self._methods: dict[str, Method] = {}
        by_name = {f.name: f for f in files}
        added: set[str] = set()

        def add(file: descriptor_pb2.FileDescriptorProto) -> None:  # dependencies first
            if file.name in added:
                return
            added.add(file.name)
            for dep in file.dependency:
                if dep not in by_name:
                    raise GrpcConfigError(f"{path!r}: {file.name} imports {dep}, which is not in the set "
                                          "(build it with protoc --include_imports)")
                add(by_name[dep])
            try:
                self.pool.Add(file)
            except (TypeError, ValueError, KeyError) as exc:
                raise GrpcConfigError(f"{path!r}: invalid {file.name}: {exc}") from None

        for file in files:
            add(file)

    def method(self, name: str) -> Method:
        """"package.Service/Method" (or "/package.Service/Method") -> Method."""
        full = name.lstrip("/")
        if full in self._methods:
            return self._methods[full]
        service, _, rpc = full.partition("/")
        try:
            desc = self.pool.FindServiceByName(service).methods_by_name[rpc]
        except KeyError:
            raise GrpcConfigError(f"gRPC method {name!r} is not in {self.path!r} "
                                  "(expected 'package.Service/Method')") from None
        if desc.client_streaming:
            raise GrpcConfigError(f"gRPC method {name!r} in {self.path!r} is "
                                  f"{'bidirectional' if desc.server_streaming else 'client'}-streaming: "
                                  "only unary and server-streaming methods are supported")
        method = self._methods[full] = Method(
            full, f"/{full}", message_factory.GetMessageClass(desc.input_type),
            message_factory.GetMessageClass(desc.output_type), desc.server_streaming, desc)
        return method

    @staticmethod
    def _http_options(desc: MethodDescriptor) -> Any:
        """The method's google.api.http HttpRule, or None. GetOptions() of a descriptor from our own
        pool sees the extension only if annotations_pb2 was imported before its options were first
        parsed (protobuf 7 / upb parses them lazily, once); re-parsing the serialized options as
        descriptor_pb2.MethodOptions (default pool, extension registered by the import above) does
        not depend on that order: unknown fields survive serialization."""
        options = descriptor_pb2.MethodOptions.FromString(desc.GetOptions().SerializeToString())
        return options.Extensions[annotations_pb2.http] if options.HasExtension(annotations_pb2.http) else None

    def http_rules(self) -> list[HttpRule]:
        """Every google.api.http binding (additional_bindings included) of every method; an
        annotation the router cannot express, or on a client-streaming method, is an error."""
        rules = []
        for file_name in self._file_names:
            for service in self.pool.FindFileByName(file_name).services_by_name.values():
                for desc in service.methods:
                    top = self._http_options(desc)
                    if top is not None:
                        rules += [self._rule(desc, r) for r in (top, *top.additional_bindings)]
        return rules

    def _rule(self, desc: MethodDescriptor, rule: Any) -> HttpRule:
        name = f"{desc.containing_service.full_name}/{desc.name}"
        kind = rule.WhichOneof("pattern")
        where = f"google.api.http of {name} in {self.path!r}"
        if kind is None:
            raise GrpcConfigError(f"{where}: a binding has no HTTP method")
        verb, template = (rule.custom.kind.upper(), rule.custom.path) if kind == "custom" else \
            (kind.upper(), getattr(rule, kind))
        where += f" ({verb} {template!r})"
        pattern, params = _translate(template, where)
        method = self.method(name)
        for field_path in params.values():
            chain = _resolve(desc.input_type, field_path)
            if chain is None or chain[-1].is_repeated or _is_plain_message(chain[-1]):
                raise GrpcConfigError(f"{where}: {field_path!r} is not a singular scalar field of "
                                      f"{desc.input_type.full_name}")
        if rule.body not in ("", "*") and rule.body not in desc.input_type.fields_by_name:
            raise GrpcConfigError(f"{where}: body {rule.body!r} is not a field of {desc.input_type.full_name}")
        if rule.response_body and rule.response_body not in desc.output_type.fields_by_name:
            raise GrpcConfigError(f"{where}: response_body {rule.response_body!r} is not a field of "
                                  f"{desc.output_type.full_name}")
        return HttpRule(verb, pattern, method.name, rule.body or None, rule.response_body or None, params)


def _error_body(code: grpc.StatusCode, message: str | None) -> dict[str, Any]:
    return {"error": {"status": _HTTP_STATUS.get(code, 500), "code": f"grpc_{code.name.lower()}",
                      "message": message or "", "grpc_status": code.value[0]}}


def _error(code: grpc.StatusCode, message: str | None) -> GrpcAnswer:
    body = _error_body(code, message)
    return GrpcAnswer(body["error"]["status"], [("content-type", "application/json"),
                                                ("grpc-status", str(code.value[0]))], msgspec.json.encode(body))


def _ok(value: Any) -> GrpcAnswer:
    return GrpcAnswer(200, [("content-type", "application/json")], msgspec.json.encode(value))


def _scalar(field: FieldDescriptor, value: str) -> Any:
    """A path or query string as json_format takes it: it parses numbers, enum names, base64 and
    well-known types from strings itself, but wants JSON true/false for bools."""
    if field.type == FieldDescriptor.TYPE_BOOL:
        if value.lower() not in _BOOLS:
            raise _BadRequest(f"{field.name}: {value!r} is not a boolean")
        return _BOOLS[value.lower()]
    return value


def _put(tree: dict[str, Any], chain: list[FieldDescriptor], value: Any) -> None:
    """Set tree[a][b][c] = value along the chain's JSON names (a ParseDict input)."""
    for field in chain[:-1]:
        tree = tree.setdefault(field.json_name, {})
        if not isinstance(tree, dict):
            raise _BadRequest(f"{field.name} is set both as a whole and field by field")
    tree[chain[-1].json_name] = value


class GrpcClient:
    """Transcoding calls over one grpc.aio channel per target address."""

    def __init__(self, descriptors: Descriptors, *, metadata_headers: frozenset[str] = DEFAULT_METADATA) -> None:
        names = frozenset(h.lower() for h in metadata_headers)
        bad = sorted(n for n in names if n in _NEVER_FORWARDED or n.startswith("grpc-") or n.endswith("-bin")
                     or not _METADATA_NAME.match(n))
        if bad:
            raise GrpcConfigError(f"headers {', '.join(bad)} cannot be passed as gRPC metadata (hop-by-hop, "
                                  "pseudo, grpc-* and binary -bin headers never are)")
        self.descriptors = descriptors
        self.metadata_headers = names
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[tuple[str, str], Any] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def _stub(self, address: str, method: Method) -> Any:
        # grpc.aio channels are tied to the loop they were created on.
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:
            raise RuntimeError("a GrpcClient is used on the event loop it was first used on only")
        stub = self._stubs.get((address, method.path))
        if stub is None:
            channel = self._channels.get(address)
            if channel is None:
                channel = self._channels[address] = grpc.aio.insecure_channel(address)
            make = channel.unary_stream if method.server_streaming else channel.unary_unary
            stub = self._stubs[address, method.path] = make(
                method.path, request_serializer=method.input.SerializeToString,
                response_deserializer=method.output.FromString)
        return stub

    def _parse(self, data: Any, message: Message, what: str) -> None:
        try:
            json_format.ParseDict(data, message, descriptor_pool=self.descriptors.pool)
        except json_format.ParseError as exc:
            raise _BadRequest(f"{what}: {exc}") from None

    def _request(self, method: Method, body: bytes, body_field: str | None,
                 path_params: dict[str, str], query: str) -> Message:
        message = method.input()
        desc = message.DESCRIPTOR
        if body_field is None:
            if body.strip():
                raise _BadRequest("this route takes no request body")
        elif body.strip():
            try:
                data = msgspec.json.decode(body)
            except msgspec.DecodeError as exc:
                raise _BadRequest(f"invalid JSON body: {exc}") from None
            field = None if body_field == "*" else desc.fields_by_name.get(body_field)
            if field is None and body_field != "*":
                raise GrpcConfigError(f"body {body_field!r} is not a field of {desc.full_name}")
            # ParseDict takes a list or a string for a message without complaint: check here.
            if (field is None or _is_plain_message(field) and not field.is_repeated) and not isinstance(data, dict):
                raise _BadRequest("the request body must be a JSON object")
            self._parse(data if field is None else {field.json_name: data}, message, "request body")
        if body_field != "*" and query:
            values: dict[str, list[str]] = {}
            for key, value in parse_qsl(query, keep_blank_values=True):
                values.setdefault(key, []).append(value)
            tree: dict[str, Any] = {}
            for key, given in values.items():
                chain = _resolve(desc, key)
                if chain is None or chain[0].name == body_field:
                    continue  # not a request field (or in the body): ignored, as grpc-gateway does
                leaf = chain[-1]
                if not leaf.is_repeated and len(given) > 1:
                    raise _BadRequest(f"query parameter {key!r} is given {len(given)} times for a single field")
                _put(tree, chain, [_scalar(leaf, v) for v in given] if leaf.is_repeated else _scalar(leaf, given[0]))
            self._parse(tree, message, "query")
        if path_params:
            tree = {}
            for field_path, value in path_params.items():
                chain = _resolve(desc, field_path)
                if chain is None:
                    raise GrpcConfigError(f"path parameter {field_path!r} is not a field of {desc.full_name}")
                _put(tree, chain, [value] if chain[-1].is_repeated else _scalar(chain[-1], value))
            self._parse(tree, message, "path")
        return message

    def _json(self, message: Message, response_body: str | None) -> Any:
        """The proto3 JSON form of the message, or of its `response_body` field."""
        pool = self.descriptors.pool
        if not response_body:
            return json_format.MessageToDict(message, descriptor_pool=pool)
        field = message.DESCRIPTOR.fields_by_name[response_body]
        if field.message_type is not None and not field.is_repeated:
            return json_format.MessageToDict(getattr(message, field.name), descriptor_pool=pool)
        # A scalar, list or map: printed even when default-valued (0, [], {}) so there is a body.
        return json_format.MessageToDict(message, always_print_fields_with_no_presence=True,
                                         descriptor_pool=pool).get(field.json_name)

    async def call(self, address: str, method: Method, *, body: bytes, body_field: str | None,
                   path_params: dict[str, str], query: str, headers: list[tuple[str, str]],
                   timeout: float, response_body: str | None = None,
                   stream_format: str = "json_array") -> GrpcAnswer:
        """One transcoded call to `address` ("host:port"); gRPC failures become error answers."""
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, not {timeout!r}")
        if stream_format not in ("json_array", "ndjson"):
            raise ValueError(f"stream_format must be 'json_array' or 'ndjson', not {stream_format!r}")
        try:
            request = self._request(method, body, body_field, path_params, query)
        except _BadRequest as exc:
            return _error(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        metadata = tuple((name.lower(), value) for name, value in headers
                         if name.lower() in self.metadata_headers and value.isascii())
        call = self._stub(address, method)(request, timeout=timeout, metadata=metadata)
        try:
            if not method.server_streaming:
                return _ok(self._json(await call, response_body))
            if stream_format == "json_array":
                items = []
                while (reply := await call.read()) is not grpc.aio.EOF:
                    items.append(self._json(reply, response_body))
                return _ok(items)
            first = await call.read()
        except grpc.aio.AioRpcError as exc:
            return _error(exc.code(), exc.details())
        except _JSON_ERRORS as exc:
            return _error(grpc.StatusCode.INTERNAL, f"cannot write the reply as JSON: {exc}")
        return GrpcAnswer(200, [("content-type", "application/x-ndjson")],
                          stream=self._lines(call, first, response_body))

    async def _lines(self, call: Any, reply: Any, response_body: str | None) -> AsyncIterator[bytes]:
        try:
            while reply is not grpc.aio.EOF:
                yield msgspec.json.encode(self._json(reply, response_body)) + b"\n"
                reply = await call.read()
        except grpc.aio.AioRpcError as exc:
            yield msgspec.json.encode(_error_body(exc.code(), exc.details())) + b"\n"
        except _JSON_ERRORS as exc:
            yield msgspec.json.encode(_error_body(grpc.StatusCode.INTERNAL, str(exc))) + b"\n"
        finally:
            call.cancel()  # the consumer stopped early: end the server's stream too (no-op when done)

    async def close(self) -> None:
        """Close every channel; the client can be used again (on a new loop) afterwards."""
        channels = list(self._channels.values())
        self._channels, self._stubs, self._loop = {}, {}, None
        for channel in channels:
            await channel.close()
