"""The gateway's own messages (not the access log), on stderr, one per line.

`text` (the default): `fastgw: message` from the supervisor, `fastgw[worker 2]: message` from a
worker, a traceback on the lines after it. `json`: one object per line, `{"time", "level",
"process", "message"}` and `"traceback"` when there is one, so that a log collector parses the
whole stream. Until a config is read the format comes from `$FASTGW_LOG_FORMAT` (a config error at
start is a message too); a config's `log.format`, when set, decides from then on."""
from __future__ import annotations

import os
import sys
import time
import traceback as _traceback

import msgspec

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
FORMATS = ("text", "json")
_threshold = LEVELS["info"]
_process = "supervisor"
_default_format = os.environ.get("FASTGW_LOG_FORMAT", "text")
if _default_format not in FORMATS:
    _default_format = "text"
_format = _default_format
_encode = msgspec.json.Encoder().encode


def log(message: str, level: str = "info", traceback: str | None = None) -> None:
    if LEVELS[level] < _threshold:
        return
    if _format == "json":
        entry = {"time": _timestamp(), "level": level, "process": _process, "message": message}
        if traceback:
            entry["traceback"] = traceback
        line = _encode(entry).decode() + "\n"
    else:
        prefix = "fastgw" if _process == "supervisor" else f"fastgw[{_process}]"
        line = f"{prefix}: {message}\n" + (traceback or "")
    # Written and flushed at once: several processes share stderr, and one write() of up to
    # PIPE_BUF bytes stays whole on a pipe (POSIX), so their lines do not interleave.
    try:
        sys.stderr.write(line)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass                       # stderr is gone: nowhere to say so


def log_exception(message: str, exc: BaseException, level: str = "error") -> None:
    """`message` and the traceback of `exc` (one field of one line in json)."""
    log(message, level, "".join(_traceback.format_exception(exc)))


def _timestamp() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


def set_log_level(level: str) -> None:
    global _threshold
    _threshold = LEVELS[level]


def configure_log(spec) -> None:
    """Apply a config's `log:` (level and format); a `format` not set is `$FASTGW_LOG_FORMAT`'s,
    else text."""
    global _format
    set_log_level(spec.level)
    _format = spec.format or _default_format


def set_process(name: str) -> None:
    """`supervisor`, or `worker N` in a worker."""
    global _process
    _process = name


def log_uncaught(exc_type, exc, tb) -> None:
    """sys.excepthook: an uncaught exception is one message too."""
    log(f"uncaught {exc_type.__name__}: {exc}", "error",
        "".join(_traceback.format_exception(exc_type, exc, tb)))


def log_loop_exception(loop, context: dict) -> None:
    """The event loop's exception handler: asyncio would otherwise write several lines through
    the logging module."""
    exc = context.get("exception")
    message = context.get("message") or "unhandled exception in the event loop"
    log(message, "error", "".join(_traceback.format_exception(exc)) if exc is not None else None)
