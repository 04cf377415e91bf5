"""`python -m converter_worker`: joins the `conversions` stream's consumer group and waits for jobs.

The EXL3 quantizer is not built yet (its own issue): until it lands this worker creates the group, exports its
metrics and heartbeat, and leaves any job entry pending in the stream so a converter that can run it will claim it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
import time

import redis.asyncio as aioredis

from shared import names
from shared.logs import setup_logging
from shared.redis_streams import ensure_group
from shared.settings import load_settings


async def _run(settings, log) -> int:
    from prometheus_client import CollectorRegistry, Gauge, start_http_server

    from shared.redis_server import free_port

    registry = CollectorRegistry()
    up = Gauge("trellis_converter_up", "1 while this converter worker runs", registry=registry)
    up.set(1)
    port = settings.converter_metrics_port or free_port()
    start_http_server(port, addr=settings.host, registry=registry)

    r = aioredis.from_url(settings.redis_url)
    await ensure_group(r, names.CONVERSIONS_STREAM, names.CONVERTER_GROUP)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    key = names.converter_key(f"{socket.gethostname()}-{os.getpid()}")
    log.info("converter worker idle (quantizer not built yet); metrics on port %d", port)
    while not stop.is_set():
        try:
            await r.hset(key, mapping={"pid": os.getpid(), "heartbeat": time.time(), "metrics_port": port})
            await r.expire(key, int(settings.heartbeat_seconds * 3) + 1)
        except aioredis.ConnectionError as exc:
            log.warning("redis unavailable: %s", exc)
        try:
            await asyncio.wait_for(stop.wait(), timeout=settings.heartbeat_seconds)
        except TimeoutError:
            pass
    await r.delete(key)
    await r.aclose()
    return 0


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="python -m converter_worker", description=__doc__).parse_args(argv)
    settings = load_settings()
    log = setup_logging("converter", settings.log_level)
    if not settings.redis_url:
        log.error("TRELLIS_REDIS_URL is not set (trellis up sets it; or point it at your Redis)")
        return 2
    return asyncio.run(_run(settings, log))


if __name__ == "__main__":
    sys.exit(main())
