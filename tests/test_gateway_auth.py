"""API keys: user and admin scopes, kept as sha256 digests, from the environment or a hot-reloaded file; 401 and 403
as OpenAI-style bodies; /health always open and /metrics configurable; open access only on loopback; and neither keys
nor prompts in the logs at the default level. Real gateways, real HTTP and websocket clients, real Redis."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
from pathlib import Path

import aiohttp
import pytest

from gateway.api_keys import KeyStore, parse_keys
from gateway.app import check_exposure, start
from tests.gateway_harness import (
    StandInWorker,
    announce_worker,
    gateway_config,
    gateway_redis_url,
    gateway_settings,
    make_model_dir,
    running_gateway,
)

MODEL = "auth-model"
USER_KEY = "user-key-0123456789abcdef"
ADMIN_KEY = "admin-key-0123456789abcdef"
KEYS = f"user:{USER_KEY}\nadmin:{ADMIN_KEY}"
COMPLETION = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 2}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_error(body: dict, status_type: str, code: str) -> None:
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["type"], error["code"]) == (status_type, code)


@pytest.fixture
def settings(redis_url: str, tmp_path: Path):
    make_model_dir(tmp_path / "models", MODEL)
    return gateway_settings(redis_url, tmp_path / "models")


@pytest.fixture
async def client(settings, redis):
    await announce_worker(redis, MODEL)
    async with running_gateway(settings, gateway_config(api_keys=KEYS)) as c:
        yield c


# -- who may do what -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
        ("POST", "/v1/tokenize"),
        ("GET", "/v1/workers"),
        ("GET", "/v1/usage"),
        ("GET", "/v1/streams/cmpl-0123"),
        ("GET", "/ready"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
        ("GET", "/no/such/route"),
    ],
)
async def test_every_route_but_health_needs_a_key(client, method: str, path: str) -> None:
    resp = await client.request(method, path, json={})
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert_error(await resp.json(), "authentication_error", "missing_api_key")
    wrong = await client.request(method, path, json={}, headers=bearer("not-a-key-at-all-0123"))
    assert wrong.status == 401
    assert_error(await wrong.json(), "authentication_error", "invalid_api_key")
    assert (await client.get("/health")).status == 200


async def test_a_user_key_may_use_the_api_but_only_an_admin_key_sees_workers_and_metrics(client) -> None:
    for path in ("/v1/models", "/ready", "/openapi.json", "/v1/usage"):
        assert (await client.get(path, headers=bearer(USER_KEY))).status in (200, 503), path
    for path in ("/v1/workers", "/metrics"):
        refused = await client.get(path, headers=bearer(USER_KEY))
        assert refused.status == 403, path
        assert_error(await refused.json(), "permission_error", "insufficient_scope")
        assert (await client.get(path, headers=bearer(ADMIN_KEY))).status == 200, path


@pytest.mark.parametrize(("metrics_auth", "without_key", "user_key"), [("none", 200, 200), ("user", 401, 200)])
async def test_metrics_access_is_configurable(settings, metrics_auth: str, without_key: int, user_key: int) -> None:
    async with running_gateway(settings, gateway_config(api_keys=KEYS, metrics_auth=metrics_auth)) as c:
        assert (await c.get("/metrics")).status == without_key
        assert (await c.get("/metrics", headers=bearer(USER_KEY))).status == user_key


async def test_a_websocket_needs_a_key_too(client) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        async with client.ws_connect("/v1/ws"):
            pass
    assert refused.value.status == 401
    async with client.ws_connect("/v1/ws", headers=bearer(USER_KEY)) as ws:
        await ws.send_json({"id": "x", "type": "cancel"})
        assert (await ws.receive_json(timeout=5))["error"]["code"] == "unknown_id"


# -- where keys come from ------------------------------------------------------------------------------------------
def test_keys_are_kept_only_as_digests_in_every_format() -> None:
    digest = hashlib.sha256(b"hashed-only-key-0123").hexdigest()
    text = f"# operators\nuser:{USER_KEY}\nadmin:sha256:{digest}\n\n"
    listed = f'["user:{USER_KEY}", {{"scope": "admin", "sha256": "{digest}", "name": "ops", "rpm": 5}}]'
    for source in (text, listed):
        keys = parse_keys(source, "test")
        assert [k.scope for k in keys] == ["user", "admin"]
        assert keys[0].digest == hashlib.sha256(USER_KEY.encode()).digest()
        assert keys[1].digest.hex() == digest
        assert all(USER_KEY not in repr(k) for k in keys)
    store = KeyStore(text)
    assert store.authenticate("hashed-only-key-0123").scope == "admin"
    assert store.authenticate(USER_KEY).scope == "user"
    assert store.authenticate(USER_KEY + "x") is None


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("root:abcdefghijklmnopq", "scope must be one of"),
        ("user:short", "at least 16 characters"),
        ("justakeywithoutscope12345", "expected 'scope:key'"),
        ("admin:sha256:1234", "64 hex digits"),
        ('[{"scope": "user", "key": "abcdefghijklmnopq", "rpm": -1}]', "non-negative integer"),
        ("[not json", "not a valid JSON list"),
    ],
)
def test_a_bad_key_entry_is_refused_naming_the_entry_but_not_the_key(text: str, complaint: str) -> None:
    with pytest.raises(ValueError) as refused:
        parse_keys(text, "TRELLIS_API_KEYS")
    assert complaint in str(refused.value) and "TRELLIS_API_KEYS" in str(refused.value)
    assert "abcdefghijklmnopq" not in str(refused.value) and "justakey" not in str(refused.value)


async def test_the_key_file_is_reloaded_when_it_changes(settings, redis, tmp_path: Path) -> None:
    key_file = tmp_path / "keys.txt"
    old_key, new_key = "first-key-0123456789", "second-key-0123456789"
    key_file.write_text(f"user:{old_key}\n")
    async with running_gateway(settings, gateway_config(api_keys_file=key_file)) as c:
        assert (await c.get("/v1/models", headers=bearer(old_key))).status == 200
        assert (await c.get("/v1/models", headers=bearer(new_key))).status == 401
        key_file.write_text(f"user:{new_key}\n")  # the old key is revoked, the new one added
        os.utime(key_file, ns=(0, 10**18))  # a different mtime, even on a coarse clock
        await asyncio.sleep(1.1)  # the file is checked at most once a second
        assert (await c.get("/v1/models", headers=bearer(new_key))).status == 200
        assert (await c.get("/v1/models", headers=bearer(old_key))).status == 401
        key_file.write_text("user:broken")  # a bad edit keeps the previous keys rather than locking everyone out
        await asyncio.sleep(1.1)
        assert (await c.get("/v1/models", headers=bearer(new_key))).status == 200


# -- open access is for loopback only ------------------------------------------------------------------------------
def test_open_access_is_refused_on_a_non_loopback_address() -> None:
    for host in ("127.0.0.1", "::1", "localhost"):
        check_exposure(host, keys_configured=False, allow_open=False)
    for host in ("0.0.0.0", "192.0.2.7", "gateway.example"):
        with pytest.raises(ValueError, match="TRELLIS_ALLOW_OPEN"):
            check_exposure(host, keys_configured=False, allow_open=False)
        check_exposure(host, keys_configured=True, allow_open=False)
        check_exposure(host, keys_configured=False, allow_open=True)


async def test_start_refuses_all_interfaces_without_keys_and_says_why_it_is_open_on_loopback(
    settings, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ValueError, match="no API keys configured"):
        await start(dataclasses.replace(settings, host="0.0.0.0"))
    caplog.set_level(logging.INFO)
    async with running_gateway(settings, gateway_config()) as c:
        assert (await c.get("/v1/models")).status == 200  # open, no key needed
    assert "no API keys configured: open access, listening on loopback" in caplog.text


# -- what the logs never hold --------------------------------------------------------------------------------------
async def test_keys_and_prompts_never_reach_the_logs_at_the_default_level(
    settings, redis, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)  # the default level
    secret_prompt = "my secret prompt about the quarterly numbers"
    async with (
        StandInWorker(gateway_redis_url(redis_url), MODEL),
        running_gateway(settings, gateway_config(api_keys=KEYS)) as c,
    ):
        body = {"model": MODEL, "prompt": secret_prompt, "max_tokens": 2}  # no tokenizer: a 500 is logged
        await c.post("/v1/completions", json=body, headers=bearer(USER_KEY))
        await c.post("/v1/completions", json={**body, "temperature": -1}, headers=bearer(USER_KEY))
        await c.post("/v1/completions", json=COMPLETION, headers=bearer(USER_KEY))
        await c.post("/v1/completions", json=body, headers=bearer("wrong-key-but-secret-123"))
        async with c.ws_connect("/v1/ws", headers=bearer(ADMIN_KEY)) as ws:
            await ws.send_json({"id": "a", "type": "completions", "body": body})
            await ws.receive_json(timeout=5)
    assert caplog.records  # the gateway did log (access log, errors): just not these
    for secret in (USER_KEY, ADMIN_KEY, "wrong-key-but-secret", "quarterly numbers"):
        assert secret not in caplog.text
