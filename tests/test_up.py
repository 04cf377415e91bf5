"""`trellis up` (what `make run` runs): serves the default model, prints the curl, and Ctrl-C stops every child."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from shared.redis_server import free_port


def _children(pid: int) -> set[int]:
    """Every descendant pid of pid, read from /proc (children run in their own sessions)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_trellis_up_serves_then_ctrl_c_stops_every_process(default_model_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    env = dict(os.environ, TRELLIS_PORT=str(port), TRELLIS_MODELS_DIR=str(default_model_dir.parent),
               TRELLIS_WORK_DIR=str(tmp_path / "work"), TRELLIS_REDIS_URL="", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "shared.cli", "up"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "curl http" in line:
                break
        output = "".join(lines)
        assert f"http://127.0.0.1:{port}/v1" in output, output
        curl = next(line for line in lines if "curl http" in line)
        body = curl.split("-d '", 1)[1].rsplit("'", 1)[0]
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            answer = json.loads(resp.read())
        assert answer["choices"][0]["message"]["content"]
        children = _children(proc.pid)
        assert len(children) >= 4  # redis-server, gateway, inference worker, converter worker
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    assert proc.returncode == 0
    time.sleep(0.5)
    assert not [pid for pid in children if _alive(pid)]
