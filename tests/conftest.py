"""Fixtures for black-box tests: the gateway as a real subprocess, upstream servers in threads.

    gw = gateway(proxy_config(upstream.port))      # start `python -m fastgw run -c <yaml>`
    resp = gw.request("GET", "/x")                 # http.client; gw.connect() for raw bytes

`FASTGW_TEST_CMD` replaces the command prefix (default `<python> -m fastgw run`); `-c FILE` is
appended. Helpers shared by the test modules live in `upstreams.py`.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from upstreams import (HOST, RawConnection, RecordingUpstream, Response, free_port,  # noqa: E402,F401
                       http_request, proxy_config)

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (over 10 s)")


def _proc_children(pid: int) -> list[int]:
    """Descendants of `pid` (workers forked by a supervisor), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Gateway:
    """A running `fastgw run` process serving `config` (written as YAML into `workdir`)."""

    def __init__(self, config: dict, workdir: Path, env: dict | None = None):
        self.config, self.workdir, self.env = config, workdir, env or {}
        workdir.mkdir(parents=True, exist_ok=True)
        access = config.setdefault("log", {}).setdefault("access", {})
        access.setdefault("format", "json")
        access.setdefault("path", str(workdir / "access.log"))
        self.access_log_path = Path(access["path"])
        self.config_path = workdir / "gateway.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        # The first HTTP listener is the one `request` talks to (else the first listener).
        listeners = sorted(config["listeners"], key=lambda lst: lst.get("protocol", "http") != "http")
        self.port = int(listeners[0]["bind"].rsplit(":", 1)[1])
        self.url = f"http://{HOST}:{self.port}"
        admin = config.get("admin")
        self.admin_port = int(admin["bind"].rsplit(":", 1)[1]) if admin else None
        self.admin_token = admin.get("token") if admin else None
        self.stdout_path, self.stderr_path = workdir / "stdout.log", workdir / "stderr.log"
        self.proc: subprocess.Popen | None = None
        self.stopped = False
        self.needed_kill = False                  # SIGTERM did not stop it within STOP_TIMEOUT
        self.exited_early: int | None = None      # return code if it exited before stop()

    def start(self) -> "Gateway":
        prefix = shlex.split(os.environ.get("FASTGW_TEST_CMD", "")) or [sys.executable, "-m", "fastgw", "run"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        env.pop("FASTGW_CONFIG", None)
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen([*prefix, "-c", str(self.config_path)], cwd=REPO_ROOT,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                self.stopped = True              # reported here, not again at teardown
                raise RuntimeError(f"gateway exited with code {self.proc.returncode} at startup:\n"
                                   f"{self.stderr_text()}")
            if self._serving():
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"gateway did not listen on {self.port} within {START_TIMEOUT}s:\n"
                                   f"{self.stderr_text()}")
            time.sleep(0.05)

    def _serving(self) -> bool:
        """With an admin API: every worker runs the config (readiness); else the port accepts."""
        try:
            if self.admin_port is not None:
                return http_request(self.admin_port, "GET", "/status/ready", timeout=1.0).status == 200
            socket.create_connection((HOST, self.port), timeout=0.2).close()
            return True
        except OSError:
            return False

    def admin(self, method: str = "GET", path: str = "/status", body=None, *,
              token: str | None = "<config>", headers: dict | None = None) -> Response:
        """A request to the admin API; `body` (not bytes) is sent as JSON; the configured token
        is sent unless `token` says otherwise (None: no Authorization header)."""
        token = self.admin_token if token == "<config>" else token
        headers = dict(headers or {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        return http_request(self.admin_port, method, path, headers=headers, body=body, timeout=60.0)

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.admin("GET", "/status").json()["workers"]]

    def stop(self) -> None:
        """SIGTERM, wait, then SIGKILL (the process and its descendants, by PID)."""
        if self.proc is None or self.stopped:
            return
        self.stopped = True
        if self.proc.poll() is not None:
            self.exited_early = self.proc.returncode
            return
        children = _proc_children(self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.needed_kill = True
            for pid in [self.proc.pid, *children, *_proc_children(self.proc.pid)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait(STOP_TIMEOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_bytes(self) -> int:
        """Resident memory of the gateway process and its workers (VmRSS summed)."""
        return sum(_rss(p) for p in [self.pid, *_proc_children(self.pid)])

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def wait_exit(self, timeout: float) -> int:
        """Wait for the gateway to exit by itself (a test that stops it); returns its exit code."""
        code = self.proc.wait(timeout)
        self.stopped = True
        return code

    def tracebacks(self) -> int:
        return self.stderr_text().count("Traceback (most recent call last)")

    def access_log_lines(self, min_count: int = 0, timeout: float = 5.0) -> list[dict]:
        """Parsed JSON access-log lines; waits (the log is written off the hot path) for `min_count`."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.access_log_path.read_text() if self.access_log_path.exists() else ""
            lines = [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]
            if len(lines) >= min_count or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)

    def request(self, method: str = "GET", path: str = "/", **kwargs) -> Response:
        return http_request(self.port, method, path, **kwargs)

    def connect(self, timeout: float = 5.0) -> RawConnection:
        return RawConnection(self.port, timeout)


class Harness:
    """Starts gateways and upstream servers and stops them all (upstreams first, so that requests
    held by a silent upstream end quickly). Teardown fails on a gateway that died by itself, on one
    that SIGTERM does not stop in time, and on errors inside the test servers."""

    active: list["Harness"] = []

    def __init__(self, workdir: Path):
        self.workdir, self.gateways, self.upstreams = workdir, [], []
        Harness.active.append(self)

    def gateway(self, config: dict, env: dict | None = None) -> Gateway:
        gw = Gateway(config, self.workdir / f"gw{len(self.gateways)}", env)
        self.gateways.append(gw)
        return gw.start()

    def upstream(self, server: RecordingUpstream):
        self.upstreams.append(server)
        return server.start()

    def close(self) -> None:
        Harness.active.remove(self)
        for server in self.upstreams:
            server.stop()
        for gw in self.gateways:
            gw.stop()
        problems = [f"gateway exited with code {gw.exited_early} during the test:\n{gw.stderr_text()[-3000:]}"
                    for gw in self.gateways if gw.exited_early is not None]
        problems += [f"gateway did not exit within {STOP_TIMEOUT}s of SIGTERM although every client "
                     f"connection was closed and every upstream stopped:\n{gw.stderr_text()[-3000:]}"
                     for gw in self.gateways if gw.needed_kill]
        problems += [f"upstream {s.name} got unparseable bytes from the gateway: {e}"
                     for s in self.upstreams for e in s.protocol_errors]
        problems += [f"test upstream {s.name} failed (a harness bug): {e}" for s in self.upstreams for e in s.errors]
        if problems:
            pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture
def harness(tmp_path):
    h = Harness(tmp_path)
    yield h
    h.close()


@pytest.fixture(scope="module")
def module_harness(tmp_path_factory):
    h = Harness(tmp_path_factory.mktemp("module"))
    yield h
    h.close()


@pytest.fixture
def gateway(harness):
    """Factory: gateway(config: dict) -> Gateway, stopped at teardown."""
    return harness.gateway


@pytest.fixture
def start_upstream(harness):
    """Factory: start_upstream(server) -> the server, started now and stopped at teardown."""
    return harness.upstream


@pytest.fixture
def upstream(start_upstream) -> RecordingUpstream:
    """A RecordingUpstream with the default handler (200 + JSON describing the request)."""
    return start_upstream(RecordingUpstream())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On failure, show the tail of each gateway's stderr."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for h in Harness.active:
            for gw in h.gateways:
                text = gw.stderr_text()
                if text:
                    report.sections.append((f"gateway stderr ({gw.workdir.name})", text[-4000:]))


@pytest.fixture
def redis_servers():
    """Start real redis-server processes: `start(port=0)`; all are killed at the end."""
    from redis_server import RedisServer

    started: list[RedisServer] = []

    def start(port: int = 0) -> RedisServer:
        server = RedisServer(port)
        started.append(server)
        return server
    yield start
    for server in started:
        server.stop()
