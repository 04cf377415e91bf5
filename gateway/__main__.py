"""`python -m gateway` (or `trellis gateway`): the HTTP/SSE/WebSocket gateway, until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from gateway.app import serve
from shared.logs import setup_logging
from shared.settings import Settings, load_settings


async def _run(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await serve(settings, stop)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway", description=__doc__)
    parser.add_argument("--host", help="listen address (default: TRELLIS_HOST)")
    parser.add_argument("--port", type=int, help="listen port (default: TRELLIS_PORT)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = load_settings(**overrides)
    log = setup_logging("gateway", settings.log_level)
    if not settings.redis_url:
        log.error("TRELLIS_REDIS_URL is not set (trellis up sets it; or point it at your Redis)")
        return 2
    try:
        asyncio.run(_run(settings))
    except ValueError as exc:  # a bad key list, or open access on a non-loopback address
        log.error("cannot start: %s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
