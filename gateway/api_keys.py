"""API keys: parsed from ``TRELLIS_API_KEYS`` and/or ``TRELLIS_API_KEYS_FILE``, kept only as sha256 digests.

Entry formats (docs/security.md):
- text: one entry per line (or comma separated): ``scope:key`` or ``scope:sha256:<64 hex digits>``; ``#`` comments.
- JSON: a list of such strings, or of objects ``{"scope", "key" | "sha256", "name", "rpm", "tokens_per_day"}``.

The file is re-read when its modification time, size or inode changes (checked at most once a second, on use), so
keys are added or revoked without a restart. A file that fails to parse on reload keeps the previous keys and logs
an error; at start it is fatal. Nothing here ever logs a key or its digest.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("gateway.api_keys")

USER = "user"
ADMIN = "admin"
SCOPES = (USER, ADMIN)
MIN_KEY_CHARS = 16  # a short key is guessable; refuse it rather than protect nothing
RELOAD_CHECK_SECONDS = 1.0
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ApiKey:
    digest: bytes  # sha256 of the key
    scope: str  # USER | ADMIN (admin may do everything a user may)
    name: str = ""
    rpm: int | None = None  # None: the configured default
    tokens_per_day: int | None = None

    @property
    def key_id(self) -> str:
        """A stable, non-secret name for the key (logs, metrics, Redis counters): a prefix of its digest."""
        return self.digest.hex()[:16]

    def allows(self, scope: str) -> bool:
        return self.scope == ADMIN or self.scope == scope


def digest_of(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def parse_keys(text: str, source: str) -> list[ApiKey]:
    """Every key in ``text``; ValueError naming ``source`` and the entry (never the key itself) on a bad one."""
    stripped = text.strip()
    if not stripped:
        return []
    if stripped.startswith("["):
        try:
            items = json.loads(stripped)
        except ValueError as exc:
            raise ValueError(f"{source}: not a valid JSON list of keys: {exc}") from None
        if not isinstance(items, list):
            raise ValueError(f"{source}: a JSON key list must be an array")
        return [_parse_item(item, f"{source} entry {i + 1}") for i, item in enumerate(items)]
    keys = []
    lines = [line for chunk in stripped.splitlines() for line in chunk.split(",")]
    for i, line in enumerate(lines):
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(_parse_entry(line, f"{source} entry {i + 1}"))
    return keys


def _parse_entry(entry: str, where: str) -> ApiKey:
    scope, sep, secret = entry.partition(":")
    if not sep:
        raise ValueError(f"{where}: expected 'scope:key' (scope is one of {list(SCOPES)})")
    return _make_key(scope.strip(), secret.strip(), None, where)


def _parse_item(item: Any, where: str) -> ApiKey:
    if isinstance(item, str):
        return _parse_entry(item, where)
    if not isinstance(item, dict):
        raise ValueError(f"{where}: must be a 'scope:key' string or an object")
    unknown = set(item) - {"scope", "key", "sha256", "name", "rpm", "tokens_per_day"}
    if unknown:
        raise ValueError(f"{where}: unknown fields {sorted(unknown)}")
    if ("key" in item) == ("sha256" in item):
        raise ValueError(f"{where}: give exactly one of 'key' or 'sha256'")
    secret = item["key"] if "key" in item else f"sha256:{item['sha256']}"
    if not isinstance(secret, str):
        raise ValueError(f"{where}: 'key' must be a string")
    limits = {}
    for field in ("rpm", "tokens_per_day"):
        value = item.get(field)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"{where}: '{field}' must be a non-negative integer (0: unlimited)")
        limits[field] = value
    name = item.get("name", "")
    if not isinstance(name, str):
        raise ValueError(f"{where}: 'name' must be a string")
    key = _make_key(str(item.get("scope", "")), secret, name, where)
    return ApiKey(key.digest, key.scope, name, limits["rpm"], limits["tokens_per_day"])


def _make_key(scope: str, secret: str, name: str | None, where: str) -> ApiKey:
    if scope not in SCOPES:
        raise ValueError(f"{where}: scope must be one of {list(SCOPES)}, got {scope!r}")
    if secret.startswith("sha256:"):
        hexdigest = secret[len("sha256:") :].lower()
        if not _HEX64.match(hexdigest):
            raise ValueError(f"{where}: 'sha256:' must be followed by 64 hex digits")
        return ApiKey(bytes.fromhex(hexdigest), scope, name or "")
    if len(secret) < MIN_KEY_CHARS or any(c.isspace() for c in secret):
        raise ValueError(f"{where}: a key must be at least {MIN_KEY_CHARS} characters with no whitespace")
    return ApiKey(digest_of(secret), scope, name or "")


class KeyStore:
    """The configured keys; ``configured`` is True when either source is set (an empty file then admits nobody)."""

    def __init__(self, env_text: str = "", path: Path | None = None) -> None:
        self.env_text = env_text
        self.path = path
        self.configured = bool(env_text.strip()) or path is not None
        self._env_keys = parse_keys(env_text, "TRELLIS_API_KEYS")
        self._file_keys: list[ApiKey] = []
        self._file_stamp: tuple[int, int, int] | None = None
        self._checked_at = -float("inf")
        if path is not None:
            self._file_keys = parse_keys(path.read_text(encoding="utf-8"), str(path))  # fatal at start
            self._file_stamp = _stamp(path)
            self._checked_at = time.monotonic()

    @property
    def keys(self) -> list[ApiKey]:
        return self._env_keys + self._file_keys

    def authenticate(self, token: str) -> ApiKey | None:
        """The key matching ``token``, compared in constant time against every digest (no early exit)."""
        self.reload_if_changed()
        presented = digest_of(token)
        match = None
        for key in self.keys:
            if hmac.compare_digest(key.digest, presented):
                match = key
        return match

    def reload_if_changed(self, force: bool = False) -> bool:
        """Re-read the key file if it changed; True when the keys were replaced."""
        if self.path is None:
            return False
        now = time.monotonic()
        if not force and now - self._checked_at < RELOAD_CHECK_SECONDS:
            return False
        self._checked_at = now
        try:
            stamp = _stamp(self.path)
            if stamp == self._file_stamp and not force:
                return False
            keys = parse_keys(self.path.read_text(encoding="utf-8"), str(self.path))
        except (OSError, ValueError) as exc:
            log.error("keeping the previous API keys: cannot reload %s: %s", self.path, exc)
            return False
        self._file_keys, self._file_stamp = keys, stamp
        log.info("reloaded %d API keys from %s", len(keys), self.path)
        return True


def _stamp(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_size, st.st_ino)
