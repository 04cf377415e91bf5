"""The gateway's Prometheus metrics, on a registry of its own (one per app, so tests can run several apps)."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gateway.cluster_metrics import ClusterMetrics

# Time to first token spans queueing plus prefill: from milliseconds to minutes under load.
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "trellis_gateway_requests",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "trellis_gateway_rejected",
            "Requests refused or failed, by reason (error code)",
            ["reason"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "trellis_gateway_ttft_seconds",
            "Request received to first token relayed",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.open_streams = Gauge(
            "trellis_gateway_open_streams", "Generations being relayed right now", ["transport"], registry=self.registry
        )
        for transport in ("http", "sse", "websocket"):
            self.open_streams.labels(transport)  # export zeros before the first request
        self.cluster = ClusterMetrics(self.registry)

    def response(self) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


def route_label(request: web.Request) -> str:
    """The route's template (``/v1/completions``), never the raw path: label values must stay few."""
    info = request.match_info
    route = getattr(info, "route", None)
    resource = getattr(route, "resource", None)
    return resource.canonical if resource is not None else "unmatched"
