"""A worker killed mid-stream is replaced without the client noticing; an entry that keeps failing is dead-lettered."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path

import pytest
import redis

from shared import names, wire
from shared.redis_streams import entry
from shared.settings import DEFAULT_MODEL_ID
from tests.suite import live_workers, open_completion, running_suite

MODEL = DEFAULT_MODEL_ID
FAST_FAILOVER = {"TRELLIS_HEARTBEAT_SECONDS": "0.5", "TRELLIS_RECLAIM_IDLE_SECONDS": "2",
                 "TRELLIS_MAX_BATCH_SIZE": "4"}


@pytest.fixture(scope="module")
def suite(redis_url: str, default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    db_url = redis_url.rsplit("/", 1)[0] + "/7"  # a database of its own: no other test's streams or heartbeats
    redis.Redis.from_url(db_url).flushdb()
    logs = tmp_path_factory.mktemp("fault-logs")
    with running_suite(db_url, default_model_dir.parent, MODEL, logs, workers=2, **FAST_FAILOVER) as base:
        deadline = time.monotonic() + 120
        while len(live_workers(base)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        yield base, db_url


def test_worker_killed_mid_stream_resumes_without_gap_or_duplicate(suite) -> None:
    base, _ = suite
    body = {"model": MODEL, "prompt": "The history of the printing press begins", "max_tokens": 48,
            "temperature": 0, "ignore_eos": True}
    with open_completion(base, body) as resp:
        expected = json.loads(resp.read())
    want_text = expected["choices"][0]["text"]

    pieces: list[str] = []
    usage = None
    killed = None
    with open_completion(base, {**body, "stream": True, "stream_options": {"include_usage": True}}) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk["choices"]:
                pieces.append(c.get("text") or "")
            if killed is None and len(pieces) >= 8:
                busy = [w for w in live_workers(base) if int(w["active"]) > 0]
                assert len(busy) == 1, busy
                killed = int(busy[0]["pid"])
                os.kill(killed, signal.SIGKILL)
    assert killed is not None
    assert "".join(pieces) == want_text
    assert usage is not None and usage["completion_tokens"] == expected["usage"]["completion_tokens"]
    # the dead worker leaves the listing when its heartbeat key expires (3 s here), which a fast resume can beat
    deadline = time.monotonic() + 15
    while killed in [int(w["pid"]) for w in live_workers(base)] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert killed not in [int(w["pid"]) for w in live_workers(base)]


def test_entry_delivered_too_often_is_dead_lettered_with_an_error_event(suite) -> None:
    _, db_url = suite
    r = redis.Redis.from_url(db_url)
    stream = names.requests_stream(MODEL)
    request_id = uuid.uuid4().hex
    req = wire.GenerationRequest(id=request_id, model=MODEL, prompt_ids=[1, 2, 3], created=time.time())
    # a consumer that took the entry and died, three times over (each claim counts as a delivery). The add and the
    # ghost's read are one transaction so that no live worker can take the entry first.
    ghost = "ghost-consumer"
    pipe = r.pipeline(transaction=True)
    pipe.xadd(stream, entry(req.to_dict()))
    pipe.xreadgroup(names.WORKER_GROUP, ghost, {stream: ">"}, count=1)
    entry_id, got = pipe.execute()
    assert got[0][1][0][0] == entry_id
    for _ in range(3):
        r.xclaim(stream, names.WORKER_GROUP, ghost, 0, [entry_id])
    out = names.output_stream(request_id)
    deadline = time.monotonic() + 30
    events: list[dict] = []
    while time.monotonic() < deadline:
        events = [wire.unpack(f[names.PAYLOAD_FIELD]) for _, f in r.xrange(out)]
        if events:
            break
        time.sleep(0.2)
    assert events and events[-1]["type"] == "error" and events[-1]["code"] == "worker_failed", events
    dead = r.xrange(names.deadletter_stream(stream))
    assert any(wire.unpack(f[names.PAYLOAD_FIELD])["id"] == request_id for _, f in dead)
    assert not r.xpending_range(stream, names.WORKER_GROUP, entry_id, entry_id, 1)
