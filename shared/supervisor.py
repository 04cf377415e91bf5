"""`trellis up`: the whole suite in one process tree that Ctrl-C stops cleanly.

Children run in their own sessions so a terminal Ctrl-C reaches only this supervisor, which then stops them in order
(gateway first so no new work arrives, then workers, then Redis) and waits for each.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from shared.default_model import ensure_default_model
from shared.logs import setup_logging
from shared.redis_server import free_port, start_redis_server
from shared.settings import load_settings

READY_TIMEOUT_S = 300.0
STOP_GRACE_S = 15.0


def _spawn(module: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, *args], env=env, start_new_session=True)


def _wait_ready(url: str, procs: dict[str, subprocess.Popen], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode} during start-up")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def _stop(procs: list[tuple[str, subprocess.Popen]], log) -> None:
    for name, proc in procs:
        if proc.poll() is None:
            log.info("stopping %s (pid %d)", name, proc.pid)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s; killing it", name, STOP_GRACE_S)
                proc.kill()
                proc.wait()


def cli_up(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="trellis up", description="Run Redis, gateway, one inference worker "
                                     "and one converter worker on this machine.")
    parser.add_argument("--model", help="model id under TRELLIS_MODELS_DIR (default: the embedded default model)")
    args = parser.parse_args(argv)
    settings = load_settings()
    log = setup_logging("up", settings.log_level)
    model_id = args.model or settings.default_model

    if model_id == settings.default_model:
        log.info("preparing the default model in %s", settings.models_dir)
        ensure_default_model(settings.models_dir)
    elif not (settings.models_dir / model_id).is_dir():
        print(f"trellis up: no model directory {settings.models_dir / model_id}", file=sys.stderr)
        return 2

    env = dict(os.environ)
    env["TRELLIS_MODELS_DIR"] = str(settings.models_dir)
    started: list[tuple[str, subprocess.Popen]] = []  # in stop order, reversed at the end
    redis_proc = None
    if not settings.redis_url:
        port = free_port()
        redis_proc = start_redis_server(port, Path(settings.work_dir) / "redis")
        env["TRELLIS_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
        log.info("started redis-server on 127.0.0.1:%d", port)

    stopping = False

    def request_stop(signum, frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    code = 0
    try:
        started.append(("gateway", _spawn("gateway", [], env)))
        started.append(("inference worker", _spawn("inference_worker", ["--model", model_id], env)))
        started.append(("converter worker", _spawn("converter_worker", [], env)))
        base = f"http://{settings.host}:{settings.port}"
        if not _wait_ready(f"{base}/ready", dict(started), READY_TIMEOUT_S):
            raise RuntimeError(f"the suite was not ready within {READY_TIMEOUT_S:.0f} s")
        body = json.dumps({"model": model_id, "messages": [{"role": "user", "content": "Say hello in one sentence."}],
                           "max_tokens": 32})
        print(f"\nTrellis is serving {model_id} at {base}/v1 (OpenAI-compatible). Ctrl-C stops everything.\n"
              f"Try:\n  curl {base}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'\n", flush=True)
        while not stopping:
            for name, proc in started:
                if proc.poll() is not None:
                    log.error("%s exited with code %d; stopping the suite", name, proc.returncode)
                    code = 1
                    stopping = True
            time.sleep(0.5)
    except RuntimeError as exc:
        log.error("%s", exc)
        code = 1
    finally:
        _stop(started, log)
        if redis_proc is not None:
            _stop([("redis-server", redis_proc)], log)
    return code
