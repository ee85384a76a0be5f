"""``lorareg serve`` as a user starts it: a process that prints its address and serves until stopped."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _serve(home: Path, *args: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "LORAREG_HOME": str(home)}
    process = subprocess.Popen([sys.executable, "-m", "lorareg", "serve", *args], env=env, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    line = process.stderr.readline()
    match = re.search(r"lorareg playground at (http://\S+)", line)
    assert match, line + process.stderr.read()
    return process, match.group(1)


def _stop(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGINT)
    try:
        return process.wait(15)
    finally:
        if process.poll() is None:
            process.kill()


def test_serve_listens_on_loopback_and_stops_on_ctrl_c(demo_catalog):
    process, url = _serve(demo_catalog.home)
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", url)
        page = urllib.request.urlopen(url, timeout=10).read().decode()
        assert "pixel-watercolor" in page and 'name="csrf-token"' in page
        request = urllib.request.Request(url, headers={"Host": "attacker.example"})
        try:
            urllib.request.urlopen(request, timeout=10)
            raise AssertionError("a foreign Host header was answered")
        except urllib.error.HTTPError as error:
            assert error.code == 400
    finally:
        assert _stop(process) in (0, 130, -signal.SIGINT)


def test_serve_on_another_address_requires_the_printed_token(demo_catalog):
    process, url = _serve(demo_catalog.home, "--host", "0.0.0.0")
    try:
        token = re.search(r"\?token=([\w-]+)$", url).group(1)
        bare = url.split("?")[0]
        try:
            urllib.request.urlopen(bare, timeout=10)
            raise AssertionError("answered without the token")
        except urllib.error.HTTPError as error:
            assert error.code == 401
        request = urllib.request.Request(bare, headers={"Authorization": f"Bearer {token}"})
        assert "pixel-art" in urllib.request.urlopen(request, timeout=10).read().decode()
    finally:
        _stop(process)


def test_serve_refuses_a_port_in_use_in_one_line(lorareg, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = lorareg("--home", tmp_path, "serve", "--port", str(port))
    assert result.code == 1 and result.err.startswith(f"error: cannot listen on 127.0.0.1:{port}")
    assert len(result.err.strip().splitlines()) == 1
