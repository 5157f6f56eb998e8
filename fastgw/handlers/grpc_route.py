"""Routes that answer by calling a gRPC method (`routes[].grpc`): the handler between the data
plane and the transcoding engine (fastgw/handlers/grpc.py).

The service's balancer picks the target of each call; its result counts in the target's shared
memory like a proxied request's (EWMA latency, circuit breaker, passive ejection). Calls are not
retried on another target.

A route names its method (`grpc: {service, method}`; path parameters and query fill fields of the
same name, the body is the whole request message), or leaves it out and the service's
`google.api.http` annotations become the route's paths, one per annotated method.
"""
from __future__ import annotations

import time
from urllib.parse import unquote

from fastgw.api import Response


class GrpcClients:
    """One GrpcClient per gRPC service and worker, kept across reloads while the service's spec
    is unchanged (its channels stay connected)."""

    def __init__(self, previous: "GrpcClients | None" = None):
        self.clients: dict[str, tuple[object, object, object]] = {}     # name -> (spec, Descriptors, client)
        self._previous = previous.clients if previous is not None else {}

    def get(self, name: str, spec, metadata: frozenset[str]) -> tuple[object, object]:
        """(Descriptors, GrpcClient) for service `name`, passing the request headers named in
        `metadata` (besides the defaults); GrpcConfigError from a bad descriptor set."""
        # handlers.grpc needs the grpc extra (grpcio, protobuf): imported once a route calls gRPC.
        from fastgw.handlers.grpc import DEFAULT_METADATA, Descriptors, GrpcClient

        if name not in self.clients:
            kept = self._previous.get(name)
            if kept is not None and kept[0] == (spec, metadata):
                self.clients[name] = kept
            else:
                descriptors = Descriptors(spec.grpc.descriptors)
                self.clients[name] = ((spec, metadata), descriptors,
                                      GrpcClient(descriptors, metadata_headers=DEFAULT_METADATA | metadata))
        _, descriptors, client = self.clients[name]
        return descriptors, client

    async def close_unused(self, successor: "GrpcClients | None") -> None:
        kept = {id(c[2]) for c in successor.clients.values()} if successor is not None else set()
        for _, _, client in self.clients.values():
            if id(client) not in kept:
                await client.close()


class GrpcRouteHandler:
    def __init__(self, service, client, method, *, body_field: str | None, response_body: str | None,
                 params: dict[str, str], stream: str, timeout: float):
        self.service = service                    # fastgw._core.upstream.Service: its balancer picks
        self.client = client
        self.method = method
        self.body_field = body_field              # None: the body (if any) is the whole message
        self.response_body = response_body
        self.params = params                      # router parameter -> field path
        self.stream = stream
        self.timeout = timeout

    async def handle(self, view, params: dict[str, str], body: bytes, forward: dict[str, str],
                     profile: str | None) -> Response:
        target = self.service.balancer.choose(None)
        if target is None and self.service.backup_balancer is not None:
            target = self.service.backup_balancer.choose(None)
        if target is None:
            return Response.error(503, "no_healthy_upstream", "no target of the service is up")
        if not target.call_admitted():
            return Response.error(503, "circuit_open", "the circuit breaker of the target is open",
                                  {"retry-after": "1"})
        headers = list(view.headers.items()) + list(forward.items())   # the client keeps its allow-list
        started, failed = time.monotonic(), True
        try:
            answer = await self.client.call(
                target.address, self.method, body=body,
                body_field=self.body_field if self.body_field is not None else ("*" if body else None),
                path_params={self.params.get(k, k): unquote(v) for k, v in params.items()},
                query=view.query[1:], headers=headers, timeout=self.timeout,
                response_body=self.response_body, stream_format=self.stream)
            # The target failing, not the request: unreachable, overloaded, too slow, broken.
            failed = answer.status in (500, 503, 504)
        finally:
            target.call_finished(time.monotonic() - started, failed)
        response = Response(answer.status, answer.headers, body=answer.body)
        response.stream = answer.stream
        return response
