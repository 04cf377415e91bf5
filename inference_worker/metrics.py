"""Prometheus metrics of one inference worker: vLLM's metric names behind a ``trellis_`` prefix, labelled by model.

The registry is passed in (the worker's own, or a test's), never the global default, so several engines can live in
one process. The engine is the only writer.
"""

from __future__ import annotations

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# From ~1 ms (an H200 decode step) to ~60 s (a long CPU request): fine enough at both ends to read percentiles.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
)  # fmt: skip
ACCEPTANCE_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.999, 1.0)  # 0.999: "all but the last"


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry, model: str) -> None:
        self.model = model
        labels = ["model"]

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, labels, registry=registry, buckets=LATENCY_BUCKETS).labels(model=model)

        self.num_requests_running = Gauge(
            "trellis_num_requests_running", "Sequences in the running batch.", labels, registry=registry
        ).labels(model=model)
        self.num_requests_waiting = Gauge(
            "trellis_num_requests_waiting", "Sequences waiting for a slot or KV pages.", labels, registry=registry
        ).labels(model=model)
        self.kv_cache_usage_perc = Gauge(
            "trellis_kv_cache_usage_perc", "Fraction of KV cache pages in use (0 to 1).", labels, registry=registry
        ).labels(model=model)
        self.prompt_tokens = Counter(
            "trellis_prompt_tokens", "Prompt tokens prefilled (once per request).", labels, registry=registry
        ).labels(model=model)
        self.generation_tokens = Counter(
            "trellis_generation_tokens", "Tokens generated.", labels, registry=registry
        ).labels(model=model)
        self.num_preemptions = Counter(
            "trellis_num_preemptions", "Sequences preempted to free KV pages.", labels, registry=registry
        ).labels(model=model)
        self.kv_cache_free_pages = Gauge(
            "trellis_kv_cache_free_pages", "KV pages free for new tokens (cached prefixes included).", labels,
            registry=registry,
        ).labels(model=model)  # fmt: skip
        self.decode_graph_steps = Counter(
            "trellis_decode_graph_steps", "Forward steps replayed from a CUDA graph (decode, verify, short prompts).",
            labels,
            registry=registry,
        ).labels(model=model)  # fmt: skip
        self.decode_graphs = Gauge(
            "trellis_decode_graphs", "CUDA graphs captured (the served model's and a draft model's).", labels,
            registry=registry,
        ).labels(model=model)  # fmt: skip
        self.prefix_cache_queries = Counter(
            "trellis_prefix_cache_queries", "Tokens looked up in the prefix cache.", labels, registry=registry
        ).labels(model=model)
        self.prefix_cache_hits = Counter(
            "trellis_prefix_cache_hits", "Tokens found in the prefix cache (KV reused).", labels, registry=registry
        ).labels(model=model)
        self._request_success = Counter(
            "trellis_request_success",
            "Finished choices, by finish reason.",
            ["model", "finish_reason"],
            registry=registry,
        )
        self.time_to_first_token = histogram("trellis_time_to_first_token_seconds", "Arrival to first token.")
        self.inter_token_latency = histogram("trellis_inter_token_latency_seconds", "Time between tokens of a choice.")
        self.e2e_request_latency = histogram("trellis_e2e_request_latency_seconds", "Arrival to the last event.")
        self.request_queue_time = histogram("trellis_request_queue_time_seconds", "Arrival to first scheduled.")
        self.request_prefill_time = histogram("trellis_request_prefill_time_seconds", "First scheduled to first token.")
        self.request_decode_time = histogram("trellis_request_decode_time_seconds", "First token to the last one.")
        spec_labels = ["model", "method"]
        self._spec_drafts = Counter(
            "trellis_spec_decode_num_drafts", "Speculative drafts verified.", spec_labels, registry=registry
        )
        self._spec_draft_tokens = Counter(
            "trellis_spec_decode_num_draft_tokens", "Guessed tokens verified.", spec_labels, registry=registry
        )
        self._spec_accepted_tokens = Counter(
            "trellis_spec_decode_num_accepted_tokens", "Guessed tokens the target model kept.", spec_labels,
            registry=registry,
        )  # fmt: skip
        self._spec_acceptance_ratio = Histogram(
            "trellis_spec_decode_acceptance_ratio", "Kept / guessed tokens of one verification.", spec_labels,
            registry=registry, buckets=ACCEPTANCE_BUCKETS,
        )  # fmt: skip

    def request_success(self, finish_reason: str) -> None:
        self._request_success.labels(model=self.model, finish_reason=finish_reason).inc()

    def spec_decode_verified(self, method: str, proposed: int, accepted: int) -> None:
        """One speculative verification of ``proposed`` guessed tokens, ``accepted`` of them kept."""
        labels = {"model": self.model, "method": method}
        self._spec_drafts.labels(**labels).inc()
        self._spec_draft_tokens.labels(**labels).inc(proposed)
        self._spec_accepted_tokens.labels(**labels).inc(accepted)
        self._spec_acceptance_ratio.labels(**labels).observe(accepted / proposed if proposed else 0.0)


class ServiceMetrics:
    """The Redis side of a worker: load time, heartbeats, reclaimed and dead-lettered stream entries."""

    def __init__(self, registry: CollectorRegistry, model: str, stream: str) -> None:
        self.model_load_seconds = Gauge(
            "trellis_model_load_seconds", "Seconds the worker took to load its model.", ["model"], registry=registry
        ).labels(model=model)
        self.last_heartbeat = Gauge(
            "trellis_worker_last_heartbeat_timestamp_seconds",
            "Unix time of the worker's last heartbeat.",
            ["model"],
            registry=registry,
        ).labels(model=model)
        # created at 0 so that the first reclaim or dead letter shows as an increase
        self.reclaimed = Counter(
            "trellis_stream_reclaimed", "Entries taken over from a dead consumer.", ["stream"], registry=registry
        ).labels(stream=stream)
        self.dead_letters = Counter(
            "trellis_dead_letters", "Entries moved to the dead-letter stream.", ["stream"], registry=registry
        ).labels(stream=stream)
        memory = Gauge(
            "trellis_gpu_memory_bytes", "Device memory held by the model's weights and by the KV cache.",
            ["model", "kind"], registry=registry,
        )  # fmt: skip
        self.weights_bytes = memory.labels(model=model, kind="weights")
        self.kv_cache_bytes = memory.labels(model=model, kind="kv_cache")


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each storage once (a tied head shares the embedding's)."""
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (*module.parameters(), *module.buffers())
    }
    return sum(storages.values())
