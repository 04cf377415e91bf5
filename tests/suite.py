"""Starting real suite processes (gateway, inference worker) for end-to-end tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shared.redis_server import free_port, start_redis_server

REPO = Path(__file__).resolve().parent.parent


def suite_env(redis_url: str, models_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"TRELLIS_REDIS_URL": redis_url, "TRELLIS_MODELS_DIR": str(models_dir), "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def spawn(module: str, args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    log = open(log_path, "wb")  # noqa: SIM115 - closed when the process is reaped by stop()
    return subprocess.Popen(
        [sys.executable, "-m", module, *args], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT
    )


def wait_http(url: str, procs: list[subprocess.Popen], timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args} exited with {p.returncode} while starting")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError as exc:
            last = str(exc)
        time.sleep(0.3)
    raise TimeoutError(f"{url} not ready after {timeout} s: {last}")


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def live_workers(base: str) -> list[dict]:
    """GET /v1/workers of a running gateway."""
    with urllib.request.urlopen(f"{base}/v1/workers", timeout=10) as resp:
        return json.loads(resp.read())["data"]


def open_completion(base: str, body: dict):
    """POST /v1/completions; the open response (read it, or iterate a stream's lines)."""
    req = urllib.request.Request(
        f"{base}/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    return urllib.request.urlopen(req, timeout=300)


def busy_worker_pid(base: str, timeout: float = 10.0) -> int:
    """The pid of the one worker running a request (heartbeats report it within a beat)."""
    deadline = time.monotonic() + timeout
    busy: list[dict] = []
    while time.monotonic() < deadline:
        busy = [w for w in live_workers(base) if int(w["active"]) > 0]
        if len(busy) == 1:
            return int(busy[0]["pid"])
        time.sleep(0.1)
    raise AssertionError(f"expected one busy worker, saw {busy}")


@contextmanager
def running_suite(
    redis_url: str, models_dir: Path, model_id: str, log_dir: Path, workers: int = 1, **extra_env: str
) -> Iterator[str]:
    """A gateway and `workers` inference workers; yields the gateway's base URL once /ready answers 200."""
    port = free_port()
    env = suite_env(redis_url, models_dir, TRELLIS_PORT=str(port), **extra_env)
    procs = [spawn("gateway", [], env, log_dir / "gateway.log")]
    procs += [spawn("inference_worker", ["--model", model_id], env, log_dir / f"worker{i}.log") for i in range(workers)]
    try:
        wait_http(f"http://127.0.0.1:{port}/ready", procs)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(procs)


class RedisProcess:
    """A redis-server we can stop and start again on the same port."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = start_redis_server(self.port, self.data_dir)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None
