"""SIGTERM loses nothing: a worker finishes the requests it holds, takes no new ones and exits 0; a converter stops at
its next block, hands its job back, and the job resumes from the work dir on another converter, as it does after a
``kill -9``. Real processes, real redis-server, the real default model."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import redis

from shared import names, wire
from shared.redis_streams import entry
from shared.settings import DEFAULT_MODEL_ID
from tests.suite import busy_worker_pid, live_workers, open_completion, running_suite, spawn, stop, suite_env
from tests.tiny_models import write_tiny_llama

MODEL = DEFAULT_MODEL_ID
FAST = {"TRELLIS_HEARTBEAT_SECONDS": "0.5", "TRELLIS_RECLAIM_IDLE_SECONDS": "2", "TRELLIS_MAX_BATCH_SIZE": "4"}
SMALL = {"bits": 2.0, "head_bits": 2, "cal_rows": 4, "cal_cols": 32}  # the cheapest search: this tests hand-over


def _wait_exit(pid: int, timeout: float) -> int:
    """The exit status of our child ``pid`` (reaped here), or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.1)
    raise TimeoutError(f"process {pid} still running {timeout} s after SIGTERM")


def test_sigterm_worker_finishes_what_it_holds_takes_nothing_new_and_exits_cleanly(
    redis_url: str, default_model_dir: Path, tmp_path: Path
) -> None:
    db_url = redis_url.rsplit("/", 1)[0] + "/11"
    redis.Redis.from_url(db_url).flushdb()
    with running_suite(db_url, default_model_dir.parent, MODEL, tmp_path, workers=2, **FAST) as base:
        deadline = time.monotonic() + 120
        while len(live_workers(base)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        body = {
            "model": MODEL,
            "prompt": "A short history of bridges:",
            "max_tokens": 120,
            "temperature": 0,
            "ignore_eos": True,
        }
        with open_completion(base, body) as resp:
            want = json.loads(resp.read())["choices"][0]["text"]

        pieces: list[str] = []
        stopped = None
        with open_completion(base, {**body, "stream": True}) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                pieces += [c.get("text") or "" for c in chunk["choices"]]
                if stopped is None and len(pieces) >= 4:
                    stopped = busy_worker_pid(base)
                    os.kill(stopped, signal.SIGTERM)
                    # while it drains, new work goes to the other worker
                    with open_completion(base, {**body, "max_tokens": 4}) as other:
                        assert json.loads(other.read())["usage"]["completion_tokens"] == 4
        assert stopped is not None
        assert "".join(pieces) == want  # finished by the worker that was told to stop, nothing lost
        assert _wait_exit(stopped, 40) == 0
        assert stopped not in [int(w["pid"]) for w in live_workers(base)]


def test_a_converter_stopped_or_killed_mid_job_hands_it_on_and_it_resumes(redis_url: str, tmp_path: Path) -> None:
    db_url = redis_url.rsplit("/", 1)[0] + "/12"
    r = redis.Redis.from_url(db_url)
    r.flushdb()
    models, work = tmp_path / "models", tmp_path / "work"
    write_tiny_llama(models / "tiny-deep", layers=4)
    env = suite_env(db_url, models, TRELLIS_WORK_DIR=str(work), TRELLIS_DEVICE="cpu", **FAST)
    job = wire.conversion_job("tiny-deep", "tiny-deep-exl3", **SMALL)
    r.hset(names.conversion_key(job["id"]), mapping={"state": "queued"})
    r.xadd(names.CONVERSIONS_STREAM, entry(job))

    def blocks_done() -> int:
        return int((r.hget(names.conversion_key(job["id"]), "done") or b"0").decode())

    def wait_blocks(n: int, proc) -> None:
        deadline = time.monotonic() + 240
        while blocks_done() < n:
            assert proc.poll() is None, f"the converter exited early; see {tmp_path}"
            assert time.monotonic() < deadline, f"fewer than {n} blocks done"
            time.sleep(0.1)

    first = spawn("converter_worker", [], env, tmp_path / "c1.log")
    try:
        wait_blocks(1, first)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 0
    finally:
        stop([first])
    assert r.hget(names.conversion_key(job["id"]), "state") == b"queued"  # handed back, not failed or cancelled
    assert r.xpending(names.CONVERSIONS_STREAM, names.CONVERTER_GROUP)["pending"] == 1
    done_before = blocks_done()

    second = spawn("converter_worker", [], env, tmp_path / "c2.log")
    try:
        wait_blocks(done_before + 1, second)
        second.kill()  # no goodbye: its entry stays pending under its name until someone reclaims it
        second.wait()
    finally:
        stop([second])

    third = spawn("converter_worker", [], env, tmp_path / "c3.log")
    try:
        deadline = time.monotonic() + 240
        while r.hget(names.conversion_key(job["id"]), "state") not in (b"done", b"failed", b"cancelled"):
            assert third.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        stop([third])
    state = {k.decode(): v.decode() for k, v in r.hgetall(names.conversion_key(job["id"])).items()}
    assert state["state"] == "done", state
    events = [wire.unpack(f[names.PAYLOAD_FIELD]) for _, f in r.xrange(names.conversion_events(job["id"]))]
    runs = [e for e in events if e["type"] == "state" and e["state"] == "running"]
    assert [e["resumed"] for e in runs] == [False, True, True]
    assert [b["block"] for b in json.loads(state["blocks"])] == list(range(4))
    assert (models / "tiny-deep-exl3" / "config.json").is_file()
    assert not r.xpending_range(names.CONVERSIONS_STREAM, names.CONVERTER_GROUP, "-", "+", 10)
