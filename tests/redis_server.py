"""A real redis-server for the tests, on a free loopback port, stopped by PID."""
from __future__ import annotations

import shutil
import subprocess

import redis

from upstreams import HOST, free_port, wait_for


class RedisServer:
    """A real redis-server on a free loopback port, stopped by PID."""

    def __init__(self, port: int = 0):
        self.port = port or free_port()
        self.process = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", HOST,
             "--save", "", "--appendonly", "no", "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_for(self._answers, timeout=10), "redis-server did not start"

    def _answers(self) -> bool:
        try:
            return redis.Redis(host=HOST, port=self.port, socket_timeout=1).ping()
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
