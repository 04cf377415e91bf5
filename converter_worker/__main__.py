"""`python -m converter_worker`: pulls EXL3 conversion jobs from the `conversions` stream and runs them resumably."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from shared.logs import setup_logging
from shared.settings import load_settings


async def _run(settings, log) -> int:
    from prometheus_client import CollectorRegistry, start_http_server

    from converter_worker.service import ConverterMetrics, ConverterService
    from shared.redis_server import free_port

    registry = CollectorRegistry()
    metrics = ConverterMetrics(registry)
    port = settings.converter_metrics_port or free_port()
    start_http_server(port, addr=settings.host, registry=registry)
    service = ConverterService(settings, metrics, metrics_port=port)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, service.stop)
    log.info("converter worker %s waiting for jobs; metrics on port %d", service.consumer, port)
    await service.run()
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
