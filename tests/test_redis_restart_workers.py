"""Redis restarted empty (no persistence) under real processes: the gateway answers 503 with Retry-After while it is
gone, and within seconds of its return the worker has re-created its consumer group and heartbeat and requests
succeed again, with nobody restarting anything. Real gateway and worker processes on a tiny model."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.suite import RedisProcess, running_suite
from tests.tiny_models import write_tiny_llama

MODEL = "tiny-restart"
FAST = {"TRELLIS_HEARTBEAT_SECONDS": "0.5", "TRELLIS_WORKER_STALE_SECONDS": "2", "TRELLIS_DEVICE": "cpu"}
BODY = {"model": MODEL, "prompt": "hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
RECOVERY_SECONDS = 5.0


def _post(base: str) -> tuple[int, dict, dict]:
    req = urllib.request.Request(
        f"{base}/v1/completions", data=json.dumps(BODY).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def test_a_worker_recovers_by_itself_when_redis_restarts_empty(tmp_path: Path) -> None:
    models = tmp_path / "models"
    write_tiny_llama(models / MODEL, layers=2)
    server = RedisProcess(tmp_path / "redis")
    server.start()
    try:
        with running_suite(server.url, models, MODEL, tmp_path, **FAST) as base:
            status, _, body = _post(base)
            assert status == 200 and body["usage"]["completion_tokens"] == 4

            server.stop()
            status, headers, body = _post(base)
            assert status == 503 and body["error"]["code"] == "redis_unavailable" and "Retry-After" in headers

            server.start()  # empty: no streams, no groups, no heartbeats
            back = time.monotonic()
            while True:
                status, _, body = _post(base)
                if status == 200:
                    break
                assert status == 503, body  # no worker yet (until its next heartbeat), never a 500
                assert time.monotonic() - back < RECOVERY_SECONDS, f"not recovered: {body}"
                time.sleep(0.2)
            assert body["usage"]["completion_tokens"] == 4
    finally:
        server.stop()
