"""W3C trace context through the gateway, and OTLP/HTTP export of sampled requests to a real
receiver (an HTTP server in the test decoding the protobuf the exporter sends)."""
from __future__ import annotations

import http.server
import threading

import pytest

from upstreams import HOST, proxy_config, wait_for

trace_service_pb2 = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")

PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
UNSAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
FAST_FLUSH = {"OTEL_BSP_SCHEDULE_DELAY": "200"}    # the SDK's batch interval, ms (default 5000)


class OtlpReceiver:
    """POST /v1/traces with an ExportTraceServiceRequest body; spans kept in order."""

    def __init__(self):
        self.spans = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = trace_service_pb2.ExportTraceServiceRequest()
                request.ParseFromString(body)
                for rs in request.resource_spans:
                    resource = {a.key: a.value.string_value for a in rs.resource.attributes}
                    for ss in rs.scope_spans:
                        for span in ss.spans:
                            receiver.spans.append((resource, span))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer((HOST, 0), Handler)
        self.url = f"http://{HOST}:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = OtlpReceiver()
    yield r
    r.close()


def attrs(span) -> dict:
    out = {}
    for a in span.attributes:
        v = a.value
        out[a.key] = v.string_value if v.HasField("string_value") else v.int_value
    return out


def test_sampled_requests_are_exported_as_spans(gateway, upstream, receiver):
    config = proxy_config(upstream.port)
    config["tracing"] = {"otlp_endpoint": receiver.url, "sample_ratio": 0.0}
    config["workers"] = 2
    gw = gateway(config, env=FAST_FLUSH)
    assert gw.request("GET", "/traced", headers={"traceparent": PARENT}).status == 200
    assert gw.request("GET", "/not-sampled", headers={"traceparent": UNSAMPLED}).status == 200
    assert gw.request("GET", "/no-parent").status == 200       # ratio 0: a new, unsampled trace
    sent = [r.header("traceparent") for r in upstream.requests]
    # The trace id and flags go on, with our span as the new parent.
    assert sent[0].startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-") and sent[0].endswith("-01")
    assert sent[0][36:52] != "00f067aa0ba902b7"
    assert sent[1].endswith("-00") and sent[2].endswith("-00")

    assert wait_for(lambda: receiver.spans, timeout=15)
    assert len(receiver.spans) == 1
    resource, span = receiver.spans[0]
    assert resource["service.name"] == "fastgw"
    assert span.trace_id.hex() == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert span.parent_span_id.hex() == "00f067aa0ba902b7"
    assert span.span_id.hex() == sent[0][36:52]                # the id the upstream saw as parent
    assert span.name == "GET all" and span.kind == 2           # SPAN_KIND_SERVER
    assert span.end_time_unix_nano > span.start_time_unix_nano
    a = attrs(span)
    assert a["http.request.method"] == "GET" and a["url.path"] == "/traced"
    assert a["http.response.status_code"] == 200 and a["fastgw.route"] == "all"
    assert a["fastgw.upstream"] == f"{HOST}:{upstream.port}"


def test_sample_ratio_one_starts_sampled_traces(gateway, upstream, receiver):
    config = proxy_config(upstream.port)
    config["tracing"] = {"otlp_endpoint": receiver.url, "sample_ratio": 1.0}
    gw = gateway(config, env=FAST_FLUSH)
    for _ in range(3):
        assert gw.request("GET", "/x").status == 200
    assert all(r.header("traceparent").endswith("-01") for r in upstream.requests)
    assert wait_for(lambda: len(receiver.spans) == 3, timeout=15)
    trace_ids = {span.trace_id.hex() for _, span in receiver.spans}
    assert len(trace_ids) == 3 and all(not span.parent_span_id for _, span in receiver.spans)
    logged = {line["trace_id"] for line in gw.access_log_lines(3)}
    assert logged == trace_ids
