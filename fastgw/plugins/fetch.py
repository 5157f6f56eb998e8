"""A small asynchronous HTTP/1.1 client for what plugins fetch off the request path's critical
section (JWKS documents, token introspection): one request per connection, `Connection: close`,
the answer parsed by httptools, https verified against the system's CAs (or `ca`).
"""
from __future__ import annotations

import asyncio
import ssl
from urllib.parse import urlsplit

from httptools import HttpResponseParser

from fastgw._core.http1 import request_head

MAX_BODY = 1024 * 1024


class FetchError(Exception):
    pass


class _Collector:
    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, data: bytes) -> None:
        self.body += data
        if len(self.body) > MAX_BODY:
            raise FetchError("answer larger than 1 MiB")

    def on_message_complete(self) -> None:
        self.done = True


async def fetch(url: str, *, method: str = "GET", headers: dict | None = None, body: bytes = b"",
                timeout: float = 5.0, ca: str | None = None) -> tuple[int, dict, bytes]:
    """(status, headers with lower-case names, body). FetchError on anything that is not an answer."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FetchError(f"not an http(s) URL: {url!r}")
    context = None
    if parts.scheme == "https":
        context = ssl.create_default_context(cafile=ca)
    port = parts.port or (443 if context else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    fields = [("Host", parts.netloc), ("Connection", "close"), ("User-Agent", "fastgw")]
    if body or method != "GET":
        fields.append(("Content-Length", len(body)))
    fields += (headers or {}).items()
    request = request_head(method, target, fields) + body
    try:
        return await asyncio.wait_for(_exchange(parts.hostname, port, context, request), timeout)
    except asyncio.TimeoutError:
        raise FetchError(f"no answer from {url} within {timeout:g}s") from None
    except (OSError, ssl.SSLError) as exc:
        raise FetchError(f"{url}: {exc}") from None


async def _exchange(host: str, port: int, context, request: bytes) -> tuple[int, dict, bytes]:
    reader, writer = await asyncio.open_connection(host, port, ssl=context)
    try:
        writer.write(request)
        collector = _Collector()
        parser = HttpResponseParser(collector)
        while not collector.done:
            data = await reader.read(65536)
            if not data:
                break
            try:
                parser.feed_data(data)
            except Exception as exc:               # httptools errors, our size limit
                raise FetchError(f"invalid answer: {exc}") from None
        if not collector.done:
            raise FetchError("the connection closed before the answer was complete")
        return parser.get_status_code(), collector.headers, bytes(collector.body)
    finally:
        writer.close()
