"""The gateway's own messages (not the access log): one line each on stderr, prefixed with the
process they come from (`fastgw:` for the supervisor, `fastgw[worker 2]:` for a worker)."""
from __future__ import annotations

import sys

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_threshold = LEVELS["info"]
_prefix = "fastgw"


def log(message: str, level: str = "info") -> None:
    if LEVELS[level] >= _threshold:
        print(f"{_prefix}: {message}", file=sys.stderr, flush=True)


def set_log_level(level: str) -> None:
    global _threshold
    _threshold = LEVELS[level]


def set_prefix(prefix: str) -> None:
    global _prefix
    _prefix = prefix
