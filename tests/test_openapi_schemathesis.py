"""Fuzz the live gateway against its own GET /openapi.json with schemathesis (bounded: a few dozen generated
requests per operation). Every answer must be documented, no request may cause a server error (5xx; the one
exception is the documented 503 queue_timeout of a request that asked for a tiny queue timeout), and every error
body must be the well-formed OpenAI shape. The gateway runs in a thread of its own with the real default model's
tokenizer, a wire-level stand-in worker answering every generation, and API keys on."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import content_type_conformance, response_schema_conformance, status_code_conformance

from gateway.app import create_app, start
from gateway.openapi import openapi_document
from shared.redis_server import free_port
from shared.settings import load_settings
from tests.gateway_harness import StandInWorker

ADMIN_KEY = "schemathesis-admin-key-0123"
HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}"}
FUZZ_DB = 4  # a Redis database of its own: other gateway tests flush theirs
EXAMPLES_PER_OPERATION = 25
CONFIG = {"api_keys": f"admin:{ADMIN_KEY}", "retry_after_seconds": 1}


class GatewayThread:
    """gateway.app.start and a StandInWorker on an event loop in a background thread, so that schemathesis' blocking
    HTTP client can run in the test's thread."""

    def __init__(self, redis_url: str, models_dir: Path, model: str) -> None:
        self.settings = load_settings(
            env={}, redis_url=redis_url, models_dir=models_dir, default_model=model, host="127.0.0.1", port=free_port(),
            **CONFIG,
        )
        self.model = model
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._main(),), daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    async def _main(self) -> None:
        self.stop = asyncio.Event()
        runner = await start(self.settings)
        async with StandInWorker(self.settings.redis_url, self.model, capacity=32, max_model_len=2048):
            self.ready.set()
            await self.stop.wait()
        await runner.cleanup()

    def __enter__(self) -> GatewayThread:
        self.thread.start()
        assert self.ready.wait(30), "the gateway did not start"
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self.stop is not None
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)


@pytest.fixture(scope="module")
def live_gateway(redis_url: str, default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    models_dir = tmp_path_factory.mktemp("models")
    (models_dir / default_model_dir.name).symlink_to(default_model_dir, target_is_directory=True)
    url = f"{redis_url.rsplit('/', 1)[0]}/{FUZZ_DB}"
    import redis as sync_redis

    sync_redis.Redis.from_url(url).flushdb()
    with GatewayThread(url, models_dir, default_model_dir.name) as gateway:
        yield gateway.base_url


# Parametrizing needs the document at collection time, before any gateway runs: it is built by the same function
# that serves /openapi.json, and the last test checks the live route serves exactly this.
DOCUMENT = openapi_document(load_settings(env={}, **CONFIG))
schema = schemathesis.openapi.from_dict(DOCUMENT)


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    derandomize=True,  # the same examples every run: CI fails on a change, not on luck
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture],
)
def test_no_request_causes_a_server_error_and_every_error_body_is_well_formed(case, live_gateway: str) -> None:
    # always the valid key (auth has its own tests in test_gateway_auth.py), and a plain request to the websocket
    headers = {k: v for k, v in (case.headers or {}).items() if k.lower() not in ("authorization", "upgrade")}
    headers.update(HEADERS)
    response = case.call(base_url=live_gateway, headers=headers, timeout=30)
    body = response.text
    if response.status_code >= 500:
        asked_for_a_deadline = isinstance(case.body, dict) and ("queue_timeout" in case.body or "deadline" in case.body)
        assert response.status_code == 503 and asked_for_a_deadline and '"queue_timeout"' in body, (
            f"{case.method} {case.path} -> {response.status_code}: {body[:500]}"
        )
    if response.status_code >= 400 and case.path not in ("/ready",):
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"}, body
        assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
        assert error["param"] is None or isinstance(error["param"], str)
    case.validate_response(
        response, checks=[status_code_conformance, content_type_conformance, response_schema_conformance]
    )


def test_the_live_document_is_the_fuzzed_one_and_names_every_route(live_gateway: str) -> None:
    doc = requests.get(f"{live_gateway}/openapi.json", headers=HEADERS, timeout=10).json()
    assert doc == json.loads(json.dumps(DOCUMENT))
    documented = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    app = create_app(dataclasses.replace(load_settings(env={}), redis_url="redis://127.0.0.1:1/0"))
    served = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    assert served == documented
