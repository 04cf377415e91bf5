"""Conversion jobs through the gateway: submit, follow over SSE, inspect, list and cancel, with an admin key; bad
input refused with 4xx before anything is queued. Real gateway, real converter worker process, real redis-server,
real model files; the converted model is then served by a real inference worker."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from shared import names
from shared.settings import load_settings
from tests.gateway_harness import metric_samples as samples
from tests.gateway_harness import running_gateway
from tests.suite import spawn, stop, suite_env
from tests.tiny_models import write_tiny_llama

ADMIN_KEY = "admin-key-conversions-0123456789"
USER_KEY = "user-key-conversions-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
SMALL = {"bits": 3, "head_bits": 4, "cal_rows": 6, "cal_cols": 64}
CONVERSION_DB = 10  # this module's own database of the session's redis-server


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = tmp_path_factory.mktemp("models")
    write_tiny_llama(models / "tiny-src", layers=2)
    write_tiny_llama(models / "tiny-long", layers=12)
    return models


@pytest.fixture(scope="module")
def db_url(redis_url: str) -> str:
    return f"{redis_url.rsplit('/', 1)[0]}/{CONVERSION_DB}"


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("work")


@pytest.fixture(scope="module")
def converter(db_url: str, models: Path, work_dir: Path):
    env = suite_env(db_url, models, TRELLIS_WORK_DIR=str(work_dir), TRELLIS_DEVICE="cpu")
    proc = spawn("converter_worker", [], env, work_dir / "converter.log")
    try:
        yield proc
    finally:
        stop([proc])


@pytest.fixture
async def client(db_url: str, models: Path, work_dir: Path):
    settings = load_settings(
        env={}, redis_url=db_url, models_dir=models, work_dir=work_dir, api_keys=f"admin:{ADMIN_KEY}\nuser:{USER_KEY}"
    )
    async with running_gateway(settings, headers=ADMIN) as c:
        yield c


async def _submit(client: aiohttp.ClientSession, **body) -> dict:
    resp = await client.post("/v1/conversions", json=body)
    assert resp.status == 201, await resp.text()
    job = await resp.json()
    assert resp.headers["Location"] == f"/v1/conversions/{job['id']}"
    return job


async def _wait_state(client: aiohttp.ClientSession, job_id: str, states: set[str], timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = await (await client.get(f"/v1/conversions/{job_id}")).json()
        if job["state"] in states:
            return job
        await asyncio.sleep(0.2)
    raise TimeoutError(f"job {job_id} never reached {states}: {job}")


async def _converter_metrics(db_url: str) -> dict:
    r = aioredis.from_url(db_url)
    try:
        keys = [k async for k in r.scan_iter(match="converters:*")]
        port = int((await r.hget(keys[0], "metrics_port")).decode())
    finally:
        await r.aclose()
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as resp:
        return samples(await resp.text())


async def _sse_events(resp: aiohttp.ClientResponse) -> list[tuple[str | None, dict | str]]:
    events, event_id = [], None
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            data = line[6:]
            events.append((event_id, data if data == "[DONE]" else json.loads(data)))
            if data == "[DONE]":
                break
    return events


# -- refused before anything is queued -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"bits": 4}, "source"),
        ({"source": "/etc", "bits": 4}, "source"),
        ({"source": "../tiny-src", "bits": 4}, "source"),
        ({"source": "escape", "bits": 4}, "source"),  # a symlink that leads out of the models directory
        ({"source": "no-such-model", "bits": 4}, "source"),
        ({"source": "tiny-src"}, "bits"),
        ({"source": "tiny-src", "bits": 9}, "bits"),
        ({"source": "tiny-src", "bits": "4"}, "bits"),
        ({"source": "tiny-src", "bits": 4, "head_bits": 12}, "head_bits"),
        ({"source": "tiny-src", "bits": 4, "codebook": "e8p"}, "codebook"),
        ({"source": "tiny-src", "bits": 4, "allocation": "random"}, "allocation"),
        ({"source": "tiny-src", "bits": 4, "output": "../../out"}, "output"),
        ({"source": "tiny-src", "bits": 4, "output": "/tmp/out"}, "output"),
    ],
)
async def test_bad_submissions_are_refused_with_400_naming_the_field(client, models: Path, body, param) -> None:
    if not (models / "escape").exists():
        os.symlink(models.parent, models / "escape")
    resp = await client.post("/v1/conversions", json=body)
    assert resp.status == 400, await resp.text()
    error = (await resp.json())["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    listed = await (await client.get("/v1/conversions")).json()
    assert listed["data"] == []  # nothing was queued


async def test_an_existing_output_is_409_and_only_admin_keys_may_convert(client) -> None:
    resp = await client.post("/v1/conversions", json={"source": "tiny-src", "bits": 4, "output": "tiny-long"})
    assert resp.status == 409 and (await resp.json())["error"]["code"] == "output_exists"
    user = {"Authorization": f"Bearer {USER_KEY}"}
    for method, path in [("POST", "/v1/conversions"), ("GET", "/v1/conversions"), ("GET", "/v1/conversions/x"),
                         ("DELETE", "/v1/conversions/x"), ("GET", "/v1/conversions/x/events")]:
        resp = await client.request(method, path, json={"source": "tiny-src", "bits": 4}, headers=user)
        assert resp.status == 403, (method, path)
        resp = await client.request(method, path, headers={"Authorization": "Bearer nope-not-a-key"})
        assert resp.status == 401, (method, path)
    for method in ("GET", "DELETE"):
        resp = await client.request(method, "/v1/conversions/no-such-job")
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "conversion_not_found"


# -- real conversions ----------------------------------------------------------------------------------------------
async def test_a_job_converts_streams_progress_and_its_model_is_served(
    client, converter, models: Path, db_url: str, work_dir: Path
) -> None:
    job = await _submit(client, source="tiny-src", output="tiny-exl3", **SMALL)
    assert job["state"] == "queued" and job["source"] == "tiny-src" and job["bits"] == 3.0
    async with client.get(f"/v1/conversions/{job['id']}/events") as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        events = await _sse_events(resp)
    assert events[-1][1] == "[DONE]"
    payloads = [e for _, e in events[:-1]]
    assert [e["state"] for e in payloads if e["type"] == "state"] == ["running", "done"]
    blocks = [e for e in payloads if e["type"] == "progress" and e["stage"] == "block"]
    assert [b["figures"]["block"] for b in blocks] == [0, 1]

    # resuming the event stream after an id replays only what came later
    second_id = events[1][0]
    async with client.get(f"/v1/conversions/{job['id']}/events", headers={"Last-Event-ID": second_id}) as resp:
        replay = await _sse_events(resp)
    assert [e for _, e in replay] == [e for _, e in events[2:]]

    done = (await (await client.get(f"/v1/conversions/{job['id']}")).json())
    assert done["state"] == "done" and done["progress"] == 1.0 and done["output"] == "tiny-exl3"
    assert [b["block"] for b in done["blocks"]] == [0, 1]
    assert all(t["bits"] == 3 and t["proxy_error"] > 0 for t in done["blocks"][0]["tensors"].values())
    listed = await (await client.get("/v1/conversions")).json()
    assert [j["id"] for j in listed["data"]] == [job["id"]]

    # the converter's own metrics: the finished job counted, its blocks timed, its per-job series gone
    metrics = await _converter_metrics(db_url)
    assert metrics[("trellis_conversion_jobs_finished_total", (("state", "done"),))] == 1
    assert metrics[("trellis_conversion_block_seconds_count", ())] >= 2
    assert not any(dict(labels).get("conversion") == job["id"] for _name, labels in metrics)
    gateway_metrics = samples(await (await client.get("/metrics")).text())
    assert gateway_metrics[("trellis_conversion_jobs", (("state", "done"),))] == 1

    # the finished model appears in /v1/models once a worker serves it, and answers
    env = suite_env(db_url, models, TRELLIS_WORK_DIR=str(work_dir), TRELLIS_DEVICE="cpu")
    worker = spawn("inference_worker", ["--model", "tiny-exl3"], env, work_dir / "worker.log")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            served = await (await client.get("/v1/models")).json()
            if any(m["id"] == "tiny-exl3" for m in served["data"]):
                break
            assert worker.poll() is None, (work_dir / "worker.log").read_text()
            await asyncio.sleep(0.3)
        else:
            raise TimeoutError("the converted model never appeared in /v1/models")
        resp = await client.post("/v1/completions", json={"model": "tiny-exl3", "prompt": "hello", "max_tokens": 4})
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["usage"]["completion_tokens"] == 4
    finally:
        stop([worker])


async def test_cancel_stops_a_running_job_keeps_its_work_dir_and_a_queued_job_never_starts(
    client, converter, models: Path, work_dir: Path, db_url: str
) -> None:
    running = await _submit(client, source="tiny-long", output="tiny-long-a", **SMALL)
    queued = await _submit(client, source="tiny-long", output="tiny-long-b", **SMALL)  # waits: one converter
    clash = await client.post("/v1/conversions", json={"source": "tiny-src", "output": "tiny-long-b", **SMALL})
    assert clash.status == 409 and (await clash.json())["error"]["code"] == "output_exists"
    await _wait_state(client, running["id"], {"running"})
    resp = await client.delete(f"/v1/conversions/{queued['id']}")
    assert resp.status == 202 and (await resp.json())["cancel_requested"] is True
    resp = await client.delete(f"/v1/conversions/{running['id']}")
    assert resp.status == 202

    ended = await _wait_state(client, running["id"], {"cancelled", "done", "failed"})
    assert ended["state"] == "cancelled", ended
    assert not (models / "tiny-long-a").exists()
    assert (work_dir / "conversions" / running["id"] / "args.json").is_file()  # resumable
    never = await _wait_state(client, queued["id"], {"cancelled", "done", "failed"})
    assert never["state"] == "cancelled" and "started" not in never
    assert not (work_dir / "conversions" / queued["id"]).exists()

    resp = await client.delete(f"/v1/conversions/{running['id']}")
    assert resp.status == 409 and (await resp.json())["error"]["code"] == "conversion_ended"
    r = aioredis.from_url(db_url)
    try:
        assert not await r.xpending_range(names.CONVERSIONS_STREAM, names.CONVERTER_GROUP, "-", "+", 10)
    finally:
        await r.aclose()
