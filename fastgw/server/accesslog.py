"""Access log: the data plane hands over one tuple per request; formatting and writing happen
here, in batches, a few times a second (off the request path)."""
from __future__ import annotations

import os
import random
import select
import sys
import time

import msgspec

from fastgw.log import log

# Order of the tuple the data plane builds (fastgw/_core/observe.pyx, write_access_log).
# The names follow nginx's where it has one (`uri` is its $request_uri, the target as received;
# `upstream_uri` is the target sent upstream, after the route's rewrite, as Kong logs it).
FIELDS = ("ts", "request_id", "trace_id", "client_ip", "method", "host", "uri", "protocol", "path",
          "status", "flags", "route", "service", "upstream", "upstream_uri", "upstream_status",
          "attempts", "bytes_in", "bytes_out", "duration_s", "upstream_duration_s", "user_agent",
          "profile", "consumer", "ratelimit")
RATELIMIT_FIELDS = ("policy", "limit", "window_s", "remaining", "admitted")
FLUSH_INTERVAL = 0.2
MAX_PENDING = 10000       # flush early rather than hold more lines than this
# Every worker writes to the same stdout; a pipe keeps a write whole only up to PIPE_BUF bytes
# (POSIX), so stdout gets batches of whole lines no larger than that.
PIPE_BUF = getattr(select, "PIPE_BUF", 512)


# The combined format quotes fields: '"', '\\', control and non-ASCII characters in them are
# written as \xHH, as nginx does, so that a request cannot end a field or a line early.
_COMBINED_ESCAPES = {c: f"\\x{c:02X}" for c in [*range(0x20), 0x22, 0x5C, *range(0x7F, 0x100)]}


def _escape(text: str | None) -> str:
    return "-" if text is None else text.translate(_COMBINED_ESCAPES)


def _whole_lines(lines: list[bytes], limit: int):
    batch, size = [], 0
    for line in lines:
        if batch and size + len(line) > limit:
            yield b"".join(batch)
            batch, size = [], 0
        batch.append(line)
        size += len(line)
    if batch:
        yield b"".join(batch)


class AccessLog:
    def __init__(self, loop, path: str, fmt: str = "json", sample: float = 1.0):
        self._loop = loop
        self._path = path
        self._format = fmt
        self._sample = sample
        self._pending: list[tuple] = []
        self._encode = msgspec.json.Encoder().encode
        self._file = None
        self._timer = None
        self.reopen()

    def reopen(self) -> None:
        """Open (again) the log file: SIGUSR1 after a rotation."""
        if self._path == "-":
            self._file = sys.stdout.buffer
            return
        if self._file is not None:
            self._file.close()
        self._file = open(self._path, "ab", buffering=0)

    def __call__(self, record: tuple) -> None:
        if self._sample < 1.0 and random.random() >= self._sample:
            return
        self._pending.append(record)
        if len(self._pending) >= MAX_PENDING:
            self.flush()
        elif self._timer is None:
            self._timer = self._loop.call_later(FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        self._timer = None
        if not self._pending:
            return
        records, self._pending = self._pending, []
        lines = [self._line(r) for r in records]
        try:
            if self._path == "-":
                self._file.flush()
                for chunk in _whole_lines(lines, PIPE_BUF):
                    os.write(self._file.fileno(), chunk)
            else:
                self._file.write(b"".join(lines))   # O_APPEND: one write() lands whole
        except OSError as exc:                     # a full disk must not stop the proxy
            log(f"access log write failed: {exc}", "error")

    def _line(self, record: tuple) -> bytes:
        entry = dict(zip(FIELDS, record))
        ts = entry["ts"]
        entry["ts"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"
        entry["duration_s"] = round(entry["duration_s"], 6)
        if entry["upstream_duration_s"] is not None:
            entry["upstream_duration_s"] = round(entry["upstream_duration_s"], 6)
        if self._format == "combined":
            return self._combined(entry, ts)
        if entry["ratelimit"] is not None:
            entry["ratelimit"] = dict(zip(RATELIMIT_FIELDS, entry["ratelimit"]))
        return self._encode(entry) + b"\n"

    @staticmethod
    def _combined(e: dict, ts: float) -> bytes:
        """nginx's `combined` (the consumer as $remote_user; no Referer is kept), then the
        duration and, quoted, request id, upstream target and rate-limit decision."""
        when = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(ts))
        request = f'{_escape(e["method"])} {_escape(e["uri"])} {e["protocol"]}'
        limit = e["ratelimit"]
        if limit is not None:
            name, quota, window, remaining, admitted = limit
            limit = f"{name};q={quota};w={window:g};r={remaining};{'allowed' if admitted else 'refused'}"
        return (f'{_escape(e["client_ip"])} - {_escape(e["consumer"])} [{when}] "{request}" '
                f'{e["status"]} {e["bytes_out"]} "-" "{_escape(e["user_agent"])}" {e["duration_s"]} '
                f'"{_escape(e["request_id"])}" "{_escape(e["upstream_uri"])}" "{_escape(limit)}"\n').encode()

    def close(self) -> None:
        self.flush()
        if self._file is not None and self._path != "-":
            self._file.close()
        self._file = None


def open_access_log(loop, spec) -> AccessLog | None:
    if spec.path is None or spec.sample <= 0:
        return None
    if spec.path != "-":
        os.makedirs(os.path.dirname(os.path.abspath(spec.path)), exist_ok=True)
    return AccessLog(loop, spec.path, spec.format, spec.sample)
