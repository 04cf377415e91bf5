"""`python -m inference_worker --model ID`: one worker serving one model; joins the model's stream with any others."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
import time

from shared.logs import setup_logging
from shared.settings import load_settings


def serve(model_id: str, settings, log) -> int:
    """Load the model, then step the engine on this (the main) thread while the Redis side runs on another."""
    from prometheus_client import CollectorRegistry, start_http_server

    from inference_worker.engine import Engine, EngineLoop
    from inference_worker.metrics import ServiceMetrics, module_bytes
    from inference_worker.service import WorkerService
    from shared import names
    from shared.redis_server import free_port

    model_dir = settings.models_dir / model_id
    if not model_dir.is_dir():
        log.error("no model directory %s (TRELLIS_MODELS_DIR=%s)", model_dir, settings.models_dir)
        return 2
    registry = CollectorRegistry()
    t0 = time.monotonic()
    engine = Engine.from_settings(model_dir, settings, model_id=model_id, registry=registry)
    load_seconds = time.monotonic() - t0
    log.info("loaded %s on %s in %.1f s", model_id, engine.device, load_seconds)
    t0 = time.monotonic()
    if graphs := engine.warm_up_graphs():
        log.info("captured %d CUDA graphs in %.1f s", graphs, time.monotonic() - t0)
    port = settings.worker_metrics_port or free_port()
    start_http_server(port, addr=settings.host, registry=registry)
    log.info("metrics on http://%s:%d/metrics", settings.host, port)

    metrics = ServiceMetrics(registry, model_id, names.requests_stream(model_id))
    metrics.model_load_seconds.set(load_seconds)
    metrics.weights_bytes.set(module_bytes(engine.model))
    metrics.kv_cache_bytes.set(engine.cache.nbytes)
    service = WorkerService(engine, settings, model_id, metrics=metrics, metrics_port=port)
    engine_loop = EngineLoop(engine, on_events=service.publisher.submit)
    failed = threading.Event()

    def redis_side() -> None:
        try:
            asyncio.run(service.run())
        except BaseException:
            log.exception("the worker's service loop failed")
            failed.set()
        finally:
            engine_loop.stop()  # ends engine_loop.run() below

    io = threading.Thread(target=redis_side, name="worker-io")
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: service.stop())
    io.start()
    engine_loop.run()
    io.join()
    return 1 if failed.is_set() else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inference_worker", description=__doc__)
    parser.add_argument("--model", help="model id: a directory under TRELLIS_MODELS_DIR (default: the default model)")
    args = parser.parse_args(argv)
    settings = load_settings()
    log = setup_logging("worker", settings.log_level)
    if not settings.redis_url:
        log.error("TRELLIS_REDIS_URL is not set (trellis up sets it; or point it at your Redis)")
        return 2
    return serve(args.model or settings.default_model, settings, log)


if __name__ == "__main__":
    sys.exit(main())
