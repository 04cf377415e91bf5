"""The converter worker as a service: jobs from the `conversions` stream, state and progress in Redis, cancel, and
paths that never leave the models directory. Real redis-server, real converter process, real model files."""

from __future__ import annotations

import time

import pytest
import redis
import torch

from inference_worker.loader import load_model
from shared import names, wire
from shared.redis_streams import entry
from tests.suite import spawn, stop, suite_env
from tests.tiny_models import write_tiny_llama

SMALL = {"bits": 3.0, "head_bits": 4, "cal_rows": 6, "cal_cols": 64}


@pytest.fixture(scope="module")
def service(redis_url: str, tmp_path_factory: pytest.TempPathFactory):
    db_url = redis_url.rsplit("/", 1)[0] + "/8"
    r = redis.Redis.from_url(db_url)
    r.flushdb()
    models = tmp_path_factory.mktemp("models")
    write_tiny_llama(models / "tiny-src", layers=2)
    write_tiny_llama(models / "tiny-long", layers=8)
    work = tmp_path_factory.mktemp("work")
    env = suite_env(db_url, models, TRELLIS_WORK_DIR=str(work), TRELLIS_DEVICE="cpu")
    proc = spawn("converter_worker", [], env, work / "converter.log")
    try:
        yield r, models, work
    finally:
        stop([proc])


def _submit(r: redis.Redis, **job_args) -> str:
    job = wire.conversion_job(**job_args)
    r.hset(names.conversion_key(job["id"]), mapping={"state": "queued"})
    r.xadd(names.CONVERSIONS_STREAM, entry(job))
    return job["id"]


def _wait_state(r: redis.Redis, job_id: str, states: set[str], timeout: float = 240) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = {k.decode(): v.decode() for k, v in r.hgetall(names.conversion_key(job_id)).items()}
        if state.get("state") in states:
            return state
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} never reached {states}: {state}")


def _events(r: redis.Redis, job_id: str) -> list[dict]:
    return [wire.unpack(f[names.PAYLOAD_FIELD]) for _, f in r.xrange(names.conversion_events(job_id))]


def test_a_submitted_job_converts_reports_progress_and_its_output_loads(service) -> None:
    r, models, _ = service
    job_id = _submit(r, source="tiny-src", output="tiny-exl3", **SMALL)
    state = _wait_state(r, job_id, {"done", "failed"})
    assert state["state"] == "done", state
    assert state["output"] == "tiny-exl3" and float(state["progress"]) == 1.0
    events = _events(r, job_id)
    assert [e["state"] for e in events if e["type"] == "state"] == ["running", "done"]
    assert any(e["type"] == "progress" and e["stage"] == "block" for e in events)
    _model, config = load_model(models / "tiny-exl3", "cpu", torch.float32)
    assert config.num_hidden_layers == 2
    assert not r.xpending_range(names.CONVERSIONS_STREAM, names.CONVERTER_GROUP, "-", "+", 10)


def test_cancel_stops_the_job_and_keeps_a_resumable_work_dir(service) -> None:
    r, models, work = service
    job_id = _submit(r, source="tiny-long", output="tiny-long-exl3", **SMALL)
    _wait_state(r, job_id, {"running"})
    r.set(names.conversion_cancel_key(job_id), 1, ex=600)
    state = _wait_state(r, job_id, {"cancelled", "done", "failed"})
    assert state["state"] == "cancelled", state
    assert not (models / "tiny-long-exl3").exists()
    assert (work / "conversions" / job_id / "args.json").is_file()


@pytest.mark.parametrize("source", ["../escape", "/etc", "no-such-model"])
def test_paths_outside_the_models_dir_or_missing_fail_the_job_clearly(service, source: str) -> None:
    r, _, _ = service
    job_id = _submit(r, source=source, output="whatever", **SMALL)
    state = _wait_state(r, job_id, {"failed", "done"}, timeout=30)
    assert state["state"] == "failed" and state["error"], state
