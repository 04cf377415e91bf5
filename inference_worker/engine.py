"""The inference engine: requests in, wire events out, one scheduler step + one forward + sampling per ``step()``.

The engine owns the model, the paged KV cache, the scheduler and every sequence's sampling / detokenizer / stop
state. ``add_request`` and ``abort`` may be called from any thread (they only fill an inbox); everything else runs on
the one thread that calls ``step()`` (``EngineLoop``), so the model never waits on Redis or the event loop.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tokenizers
import torch
from prometheus_client import CollectorRegistry

from inference_worker.batch import ForwardBatch, build_batch, padded_chunk
from inference_worker.cuda_graphs import (
    DecodeGraphs,
    batch_bucket,
    graphs_supported,
    prompt_graph_budget,
    prompt_query_bucket,
)
from inference_worker.draft_model import DraftModelProposer
from inference_worker.key_centering import measure_keys
from inference_worker.kv_cache import KVBits, PagedKVCache, kv_bytes_per_token, parse_kv_bits
from inference_worker.metrics import WorkerMetrics
from inference_worker.models.decoder import use_fused_kernels
from inference_worker.sampling import SampledToken, SamplingState, make_generator, sample, verify_token
from inference_worker.scheduler import ScheduledSeq, Scheduler, Sequence, StepPlan
from inference_worker.speculative import (
    AcceptancePrior,
    AdaptiveDraftLength,
    DraftRequest,
    NgramProposer,
    Proposer,
    SpecRequest,
    SpeculationPlanner,
    resolve_request,
)
from inference_worker.stop import StopChecker
from inference_worker.successors import SuccessorClock
from shared import wire
from shared.detokenize import IncrementalDetokenizer
from shared.settings import Settings
from shared.tokenizer import ModelTokenizer

log = logging.getLogger("inference_worker.engine")

Event = tuple[str, dict[str, Any]]
CPU_KV_CACHE_BYTES = 1 << 30  # with kv_cache_tokens=0 on CPU, the cache stays under ~1 GiB
GPU_KV_CACHE_FRACTION = 0.9  # with kv_cache_tokens=0 on CUDA, the cache takes this share of free memory
ADMIT_LINGER_STEP_FRACTION = 0.05  # Engine.linger: the running sequences' inter-token time grows by at most this
# Engine.linger with nothing running: only successors that came early wait, and a late one would wait a whole step
ADMIT_LINGER_IDLE_FRACTION = 0.25
# Engine.linger when this worker's ends are usually followed by successors within a known gap (SuccessorClock): the
# wait may reach this share of a step (it ends when they arrive, so it usually costs the gap, not this) ...
ADMIT_LINGER_EXPECTED_FRACTION = 0.2
# ... or more when ends are rare: a wait is paid only after steps that end sequences, so the running sequences'
# inter-token time grows on average by (share of steps that end some) x (wait / step); the wait may be as long as
# keeps that average under this share (4 streams of 32 tokens: one step in eight ends one, up to 32 % of a step) ...
ADMIT_LINGER_AMORTIZED_SHARE = 0.04
ADMIT_LINGER_MAX_FRACTION = 0.5  # ... but never more than this share of a step
ENDING_STEPS_DECAY = 0.05  # the share of steps that end sequences forgets with this weight per step (~20 steps)
GPU_DRAFT_CACHE_FRACTION = 0.1  # with speculative_draft_cache_tokens=0 on CUDA, the most the draft's cache may take


@dataclass
class EngineConfig:
    device: str = "cpu"
    max_batch_size: int = 16
    max_batch_tokens: int = 2048
    kv_page_size: int = 16
    kv_cache_tokens: int = 8192
    max_model_len: int = 2048
    worker_id: str = ""  # reported in every "done" event
    kv_bits: KVBits = (None, None)  # (key, value) bits; None: unquantized (see kv_cache.parse_kv_bits)
    prefix_caching: bool = True
    speculative_method: str = "off"  # the default for requests that do not say: off | ngram | draft
    speculative_tokens: int = 4  # the most guessed tokens verified per sequence and step
    speculative_max_batch: int = 16  # with more decoding sequences than this, nobody speculates (compute-bound)
    # guesses are cut so a decode step feeds at most this many tokens (EXL3's fused matmul takes up to 32 rows; more
    # rebuild every weight, which no guess is worth)
    speculative_max_step_tokens: int = 32
    # cap each step's guesses by the measured cost of steps with and without them (SpeculationPlanner); the worker's
    # default (on) comes from Settings, unit tests opt in
    speculative_by_cost: bool = False
    # after a step that ended requests, wait up to this long (and at most a fraction of that step) for their
    # successors before stepping on without them (Engine.linger); 0: never
    admit_linger_s: float = 0.0
    # decode-only steps: "auto" replays CUDA graphs on CUDA for models that allow it (cuda_graphs.py), "off" never,
    # "static" runs the graphs' fixed buffers without capturing (any device: tests check the bookkeeping)
    decode_graphs: str = "auto"
    # with decode graphs on, steps with prompt chunks padded to at most this many tokens replay graphs too (short
    # prompts: the launches, not the GPU, set their pace); 0: they run eagerly
    prompt_graph_tokens: int = 0
    fused_norm_rope: bool = False  # on CUDA: the model's norms and rotary embeddings through kernels/norm_rope.py
    kv_key_centering: bool = True  # a quantized key cache stores keys minus each layer's mean key (key_centering.py)


class RequestError(ValueError):
    """A request that cannot run; ``code`` goes into the error event."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(eq=False)
class _Choice:
    request_id: str
    index: int
    seq: Sequence
    sampling: SamplingState
    detok: IncrementalDetokenizer
    stop: StopChecker
    spec: SpecRequest
    draft_length: AdaptiveDraftLength | None  # None: this choice never speculates
    last_token_at: float | None = None
    finished: bool = False


@dataclass(eq=False)
class _Request:
    req: wire.GenerationRequest
    arrival: float  # time.monotonic() of the gateway's acceptance (or of add_request)
    choices: list[_Choice] = field(default_factory=list)
    first_scheduled_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self.choices)


def _arrival(created: float) -> float:
    """Map the gateway's unix ``created`` onto the monotonic clock (now, when absent or in the future)."""
    now_wall, now = time.time(), time.monotonic()
    return now - (now_wall - created) if 0.0 < created <= now_wall else now


class Engine:
    """Continuous batching over one model. Any thread: ``add_request``, ``abort``, ``free_slots``, ``has_work``,
    ``stats``. The engine thread only: ``step`` (and ``fail_all`` after a step raised)."""

    def __init__(
        self,
        model: Any,
        model_config: Any,
        tokenizer: ModelTokenizer,
        cfg: EngineConfig,
        metrics: WorkerMetrics | None = None,
        proposers: Mapping[str, Proposer] | None = None,
    ) -> None:
        self.model = model
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.metrics = metrics or WorkerMetrics(CollectorRegistry(), "model")
        self.vocab_size = int(model_config.vocab_size)
        if cfg.fused_norm_rope and self.device.type == "cuda":
            use_fused_kernels(model)
        num_pages = cfg.kv_cache_tokens // cfg.kv_page_size
        if num_pages < 1:
            raise ValueError(f"kv_cache_tokens={cfg.kv_cache_tokens} is less than one page of {cfg.kv_page_size}")
        self.scheduler = Scheduler(
            num_pages, cfg.kv_page_size, cfg.max_batch_size, cfg.max_batch_tokens, prefix_caching=cfg.prefix_caching
        )
        graphs_mode = _decode_graphs_mode(cfg.decode_graphs, self.device, model)
        self.cache = PagedKVCache(
            model_config.num_hidden_layers,
            num_pages + (graphs_mode != "off"),  # decode graphs park their padding rows in one extra page
            cfg.kv_page_size,
            model_config.num_key_value_heads,
            model_config.head_dim,
            _model_dtype(model),
            self.device,
            kv_bits=cfg.kv_bits,
        )
        if cfg.kv_bits[0] is not None and cfg.kv_key_centering:
            self.cache.key_offsets, self.cache.key_scales = measure_keys(model, tokenizer)
        # the longest sequence (prompt + output) served: the model's context, and never more than the cache holds
        self.max_model_len = min(cfg.max_model_len, self.scheduler.capacity_tokens)
        self.decode_graphs = None
        if graphs_mode != "off":
            self.decode_graphs = DecodeGraphs(
                model,
                self.cache,
                cfg.max_batch_size,
                self.max_model_len,
                scratch_page=num_pages,
                num_heads=model_config.num_attention_heads,
                max_query=min(1 + wire.MAX_SPECULATIVE_TOKENS, cfg.kv_page_size),  # a request may ask for more
                capture=graphs_mode == "auto",
                prompt_tokens=prompt_graph_budget(model, cfg.prompt_graph_tokens),
            )
        self.eos_token_ids = frozenset(tokenizer.eos_token_ids) | frozenset(getattr(model_config, "eos_token_ids", ()))
        self._requests: dict[str, _Request] = {}
        self._choices: dict[str, _Choice] = {}  # by seq_id
        self._token_pieces: dict[int, tuple[str, list[int]]] = {}
        # the inbox: the only state other threads touch
        self._cond = threading.Condition()
        self._inbox: list[wire.GenerationRequest] = []
        self._aborts: list[str] = []
        self._num_live_seqs = 0  # sequences queued or scheduled, for free_slots() from any thread
        # speculative decoding: n-gram lookup is always there (it costs nothing); a draft model only when given
        self.proposers: dict[str, Proposer] = {"ngram": NgramProposer(), **(proposers or {})}
        self.planner = SpeculationPlanner() if cfg.speculative_by_cost else None
        self.acceptance_prior = AcceptancePrior()
        self._last_step_s = 0.0  # wall time of the last step that ran a forward
        self._last_prompt_step_s = 0.0  # ... and of the last one with a prompt chunk in it (Engine.linger, when idle)
        self._freed_seqs = 0  # sequences ended since the last linger(): the successors it waits for
        self._ending_steps = 1.0  # running share of steps that ended sequences (starts pessimistic: no amortizing)
        self.successors = SuccessorClock()  # how soon ended requests' successors arrive (under self._cond)
        try:
            self._default_spec = resolve_request(
                None, cfg.speculative_method, cfg.speculative_tokens, list(self.proposers)
            )
        except ValueError as exc:
            raise ValueError(f"TRELLIS_SPECULATIVE_METHOD / TRELLIS_SPECULATIVE_TOKENS: {exc}") from None

    # -- construction -------------------------------------------------------------------------------------------------
    @classmethod
    def from_settings(
        cls,
        model_dir: Path,
        settings: Settings,
        model_id: str | None = None,
        registry: CollectorRegistry | None = None,
    ) -> Engine:
        """Load the model in model_dir and size the KV cache from the settings (see shared/settings.py)."""
        from inference_worker.loader import load_model

        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        model, config = load_model(Path(model_dir), device, dtype)
        tokenizer = ModelTokenizer.from_dir(Path(model_dir))
        max_model_len = settings.max_model_len or int(config.max_position_embeddings)
        model_id = model_id or Path(model_dir).name
        proposers: dict[str, Proposer] = {}
        if settings.speculative_draft_model:  # before sizing the target's cache: it takes what the draft leaves
            proposers["draft"] = load_draft_proposer(settings, model_id, config, device, dtype, max_model_len)
        kv_bits = parse_kv_bits(settings.kv_bits)
        bytes_per_token = kv_bytes_per_token(
            config.num_hidden_layers, config.num_key_value_heads, config.head_dim, dtype, kv_bits
        )
        kv_tokens = settings.kv_cache_tokens or default_kv_cache_tokens(
            device, max_model_len, settings.max_batch_size, bytes_per_token, settings.kv_cache_memory_fraction
        )
        cfg = EngineConfig(
            device=str(device),
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.max_batch_tokens,
            kv_page_size=settings.kv_page_size,
            kv_cache_tokens=kv_tokens,
            max_model_len=max_model_len,
            worker_id=settings.worker_id,
            kv_bits=kv_bits,
            prefix_caching=settings.prefix_caching,
            speculative_method=settings.speculative_method,
            speculative_tokens=settings.speculative_tokens,
            speculative_max_batch=settings.speculative_max_batch,
            speculative_max_step_tokens=settings.speculative_max_step_tokens,
            speculative_by_cost=settings.speculative_by_cost,
            admit_linger_s=settings.admit_linger_ms / 1000.0,
            decode_graphs="auto" if settings.cuda_graphs else "off",
            prompt_graph_tokens=settings.prompt_graph_tokens,
            fused_norm_rope=settings.fused_norm_rope,
            kv_key_centering=settings.kv_key_centering,
        )
        metrics = WorkerMetrics(registry or CollectorRegistry(), model_id)
        return cls(model, config, tokenizer, cfg, metrics, proposers)

    # -- any thread ---------------------------------------------------------------------------------------------------
    def add_request(self, req: wire.GenerationRequest) -> None:
        seqs = max(1, req.params.n)
        with self._cond:
            self._inbox.append(req)
            self._num_live_seqs += seqs
            self.successors.arrived(time.monotonic(), seqs)
            self._cond.notify_all()

    def abort(self, request_id: str) -> None:
        """Stop a request: its pages are freed at the next step, which emits finish "abort" and "done"."""
        with self._cond:
            self._aborts.append(request_id)
            self._cond.notify_all()

    def free_slots(self) -> int:
        """How many more requests to pull now: room in the batch not already taken by running or waiting ones."""
        with self._cond:
            return max(0, self.cfg.max_batch_size - self._num_live_seqs)

    def has_work(self) -> bool:
        with self._cond:
            return bool(self._inbox or self._aborts or self._requests)

    def wait_for_work(self, timeout: float) -> bool:
        """Block until there is something to step (or timeout, or wake()); True when there is."""
        with self._cond:
            if not (self._inbox or self._aborts or self._requests):
                self._cond.wait(timeout)
            return bool(self._inbox or self._aborts or self._requests)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def linger(self) -> None:
        """Between steps, after one that ended sequences while nothing waits: give the freed slots' successors a
        moment to arrive (clients that send their next request as soon as one ends, like chat UIs or agents).
        Without it a successor lands just after the next step began and waits all of it, and of several that end
        together only the first makes the next step. With it the running sequences (and a successor that came first)
        wait at most ``admit_linger_s`` and at most ADMIT_LINGER_STEP_FRACTION of a step; when nothing runs, only
        early successors wait, against a whole step saved for each late one, so up to ADMIT_LINGER_IDLE_FRACTION.
        When this worker's ends are usually followed by successors (SuccessorClock) within at most
        ADMIT_LINGER_EXPECTED_FRACTION of a step, or within what keeps the running sequences' average slowdown
        under ADMIT_LINGER_AMORTIZED_SHARE given how often steps end sequences, up to that usual gap; with nothing
        running, within ADMIT_LINGER_MAX_FRACTION of the last prompt step (what a late successor would wait for when
        the first one's prompt goes ahead alone). Returns as soon as as many sequences have arrived as ended, or an
        abort comes."""
        freed, self._freed_seqs = self._freed_seqs, 0
        self._ending_steps += ENDING_STEPS_DECAY * ((1.0 if freed else 0.0) - self._ending_steps)
        if not freed or self.cfg.admit_linger_s <= 0 or self.scheduler.waiting:
            return
        running = bool(self.scheduler.running)
        fraction = ADMIT_LINGER_STEP_FRACTION if running else ADMIT_LINGER_IDLE_FRACTION
        # the step a late successor would miss: with sequences running, one like the last; with none, the first
        # arrival's prompt step (longer than the decode step that ended the others)
        step_s = self._last_step_s if running else max(self._last_step_s, self._last_prompt_step_s)
        with self._cond:
            gap = self.successors.expected_gap()
            budget = self._expected_gap_budget() if running else ADMIT_LINGER_MAX_FRACTION  # idle: nobody's ITL
            if gap is not None and 0 < step_s and gap <= budget * step_s:
                fraction = max(fraction, gap / step_s)  # a shorter wait than the gap would catch nobody
            deadline = time.monotonic() + min(self.cfg.admit_linger_s, fraction * step_s)
            while not self._aborts and sum(max(1, r.params.n) for r in self._inbox) < freed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)

    def _expected_gap_budget(self) -> float:
        """The share of a step that linger may wait for successors known to come (see ADMIT_LINGER_*)."""
        amortized = ADMIT_LINGER_AMORTIZED_SHARE / max(self._ending_steps, 1e-6)
        return min(ADMIT_LINGER_MAX_FRACTION, max(ADMIT_LINGER_EXPECTED_FRACTION, amortized))

    def warm_up_graphs(self) -> int:
        """Capture the CUDA graphs short chats need before serving (DecodeGraphs.warm_up); the graphs built."""
        return 0 if self.decode_graphs is None else self.decode_graphs.warm_up()

    def stats(self) -> dict[str, Any]:
        s = self.scheduler
        return {
            "running": len(s.running),
            "waiting": len(s.waiting),
            "kv_usage": s.kv_usage,
            "pages_free": s.num_free_pages,
            "decode_graphs": 0 if self.decode_graphs is None else self.decode_graphs.num_graphs,
            "decode_graph_steps": 0 if self.decode_graphs is None else self.decode_graphs.replays,
            "graph_capture_s": sum(g.capture_seconds for g in self._all_graphs()),
            "pages_total": s.num_pages,
        }

    # -- the engine thread --------------------------------------------------------------------------------------------
    def step(self) -> list[Event]:
        """Admit new requests, apply aborts, run one scheduled forward, sample; the events this produced."""
        with self._cond:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
        events: list[Event] = []
        for req in inbox:
            self._admit(req, events)
        for request_id in aborts:
            self._abort(request_id, events)

        started = time.perf_counter()
        graphs_before = self._num_graphs() if self.planner is not None else 0
        drafts = self._propose_drafts()
        plan = self.scheduler.schedule(drafts)
        if plan.preempted:
            self.metrics.num_preemptions.inc(len(plan.preempted))
            for seq in plan.preempted:  # its draft cache is memory others can use until it comes back
                self._forget_drafts(seq)
        self.metrics.prefix_cache_queries.inc(plan.prefix_query_tokens)
        self.metrics.prefix_cache_hits.inc(plan.prefix_hit_tokens)
        if not plan.is_empty:
            now = time.monotonic()
            for item in plan.scheduled:
                r = self._requests[self._choices[item.seq.seq_id].request_id]
                if r.first_scheduled_at is None:
                    r.first_scheduled_at = now
                    self.metrics.request_queue_time.observe(now - r.arrival)
            self._forward_and_sample(plan, events)
            self._last_step_s = time.perf_counter() - started
            steady = self.planner is None or self._num_graphs() == graphs_before  # a capture is no steady cost
            if not _decode_only(plan) and steady:
                self._last_prompt_step_s = self._last_step_s
            if self.planner is not None and steady:
                self._time_decode_step(plan, drafts, self._last_step_s)
        self._update_gauges()
        return events

    def _time_decode_step(self, plan: StepPlan, drafts: dict[str, list[int]], seconds: float) -> None:
        """Tell the planner what a decode-only step (no prompt chunk in it) cost."""
        if not _decode_only(plan):
            return
        assert self.planner is not None
        q = 1 + max((len(d) for d in drafts.values()), default=0)
        self.planner.record(self._speculation_bucket(len(plan.scheduled)), q, seconds)

    def _num_graphs(self) -> int:
        """CUDA graphs captured so far, the target's and the draft model's."""
        return sum(g.num_graphs for g in self._all_graphs())

    def _all_graphs(self) -> list[DecodeGraphs]:
        graphs = [self.decode_graphs, *(getattr(p, "graphs", None) for p in self.proposers.values())]
        return [g for g in graphs if g is not None]

    def _speculation_bucket(self, num_decoding: int) -> int:
        """The batch size a decode step of ``num_decoding`` sequences runs at (a graph pads it to its bucket)."""
        graphs = self.decode_graphs
        if graphs is None or num_decoding > graphs.max_batch:
            return num_decoding
        return batch_bucket(num_decoding, graphs.max_batch)

    def fail_all(self, message: str, code: str = "internal_error") -> list[Event]:
        """After an unexpected failure: end every live request with an error event and free everything."""
        with self._cond:
            inbox, self._inbox = self._inbox, []
            self._aborts = []
        events: list[Event] = [(req.id, _error(code, message)) for req in inbox]
        with self._cond:
            self._num_live_seqs -= sum(max(1, req.params.n) for req in inbox)
        for request_id, r in list(self._requests.items()):
            for c in r.choices:
                if not c.finished:
                    self._release(c)
            del self._requests[request_id]
            events.append((request_id, _error(code, message)))
        self.scheduler.clear_prefix_cache()  # the failed forward may have left pages half written
        self._update_gauges()
        return events

    # -- admission ----------------------------------------------------------------------------------------------------
    def _admit(self, req: wire.GenerationRequest, events: list[Event]) -> None:
        n = max(1, req.params.n)
        if req.id in self._requests:
            # a redelivered entry for a request we are still running: the running one already writes its stream
            log.warning("ignoring duplicate request %s (already running)", req.id)
            with self._cond:
                self._num_live_seqs -= n
            return
        try:
            r = self._build_request(req)
        except Exception as exc:  # a request that cannot run ends in an error event; the others carry on
            if not isinstance(exc, RequestError):
                log.exception("could not admit request %s", req.id)
            with self._cond:
                self._num_live_seqs -= n
            events.append((req.id, _error(getattr(exc, "code", "internal_error"), str(exc))))
            return
        self._requests[req.id] = r
        for c in r.choices:
            if c.finished:  # finished before a crash of the worker that ran it first (resumed request)
                with self._cond:
                    self._num_live_seqs -= 1
            elif len(c.seq.output_ids) >= c.seq.max_tokens:  # the crash came after its last token
                self._choices[c.seq.seq_id] = c
                self.scheduler.add(c.seq)
                self._finish(r, c, "length", None, events)
            else:
                self._choices[c.seq.seq_id] = c
                self.scheduler.add(c.seq)
        if req.id in self._requests and r.finished:
            events.append((req.id, self._done_event(r)))
            del self._requests[req.id]

    def _build_request(self, req: wire.GenerationRequest) -> _Request:
        p = req.params
        prompt = list(req.prompt_ids)
        if req.deadline and time.time() > req.deadline:
            raise RequestError("queue_timeout", "the request was not started before its queue deadline; it never ran")
        if not prompt:
            raise RequestError("invalid_request", "the prompt is empty: at least one token is needed")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(
                "invalid_request", f"prompt token ids out of the vocabulary [0, {self.vocab_size}): {bad[:5]}"
            )
        if p.n < 1:
            raise RequestError("invalid_request", f"n must be >= 1, got {p.n}")
        bad = [t for t in p.logit_bias if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError("invalid_request", f"logit_bias token ids out of the vocabulary: {bad[:5]}")
        if p.max_tokens < 1:
            raise RequestError("invalid_request", f"max_tokens must be >= 1, got {p.max_tokens}")
        if len(prompt) >= self.max_model_len:
            raise RequestError(
                "context_length_exceeded",
                f"the prompt has {len(prompt)} tokens; this worker serves at most {self.max_model_len} tokens "
                f"(prompt + completion)",
            )
        max_tokens = min(p.max_tokens, self.max_model_len - len(prompt))  # the context limit ends it as "length"
        reason = self.scheduler.fits(len(prompt) + max_tokens)
        if reason is not None:
            raise RequestError("kv_cache_exceeded", reason)
        try:
            spec = resolve_request(p.speculative, self._default_spec.method, self._default_spec.num_tokens,
                                   list(self.proposers))  # fmt: skip
        except ValueError as exc:
            raise RequestError("invalid_request", str(exc)) from exc
        r = _Request(req, _arrival(req.created))
        for i in range(p.n):
            # a resumed choice continues after the tokens its client already has (recomputed like a preemption)
            streamed = list(req.resume_tokens.get(i, ()))
            seq = Sequence(f"{req.id}#{i}", prompt, max_tokens, output_ids=streamed)
            try:  # choice i draws from seed + i, so n choices differ yet each is reproducible
                sampling = SamplingState(p, prompt, seq.output_ids, make_generator(p.seed, i, self.device))
                stop = StopChecker(p.stop, p.include_stop_str_in_output)
            except ValueError as exc:
                raise RequestError("invalid_request", str(exc)) from exc
            detok = IncrementalDetokenizer(self.tokenizer.tokenizer, prompt + streamed)
            draft_length = (
                AdaptiveDraftLength(spec.num_tokens, self.acceptance_prior.alpha(spec.method)) if spec.enabled else None
            )
            r.choices.append(
                _Choice(req.id, i, seq, sampling, detok, stop, spec, draft_length, finished=i in req.finished_choices)
            )
        return r

    def _abort(self, request_id: str, events: list[Event]) -> None:
        r = self._requests.get(request_id)
        if r is None:
            return  # already finished, or never here: nothing to free
        for c in r.choices:
            if not c.finished:
                self._finish(r, c, "abort", None, events)

    # -- speculation ------------------------------------------------------------------------------------------------
    def _propose_drafts(self) -> dict[str, list[int]]:
        """Guessed next tokens for the sequences that will decode this step, by seq_id (see speculative.py)."""
        decoding = [s for s in self.scheduler.running if s.num_tokens - s.num_computed == 1]
        if not decoding or len(decoding) > self.cfg.speculative_max_batch:
            return {}  # a big batch already keeps the device busy: verify rows would cost more than they save
        rows = self._speculation_bucket(len(decoding))
        most = self.cfg.speculative_max_step_tokens // rows - 1  # guesses per sequence within the step's budget
        if most < 1:
            return {}
        wanted: list[tuple[Sequence, _Choice, int]] = []
        for seq in decoding:
            c = self._choices[seq.seq_id]
            if c.draft_length is None:
                continue
            # a verification adds the kept guesses plus one token of its own: stay within max_tokens
            k = min(c.draft_length.next_length(), seq.max_tokens - len(seq.output_ids) - 1, most)
            if k > 0:
                wanted.append((seq, c, k))
        drafts: dict[str, list[int]] = {}
        if wanted and self.planner is not None:
            # cheap proposers guess first, so the planner prices guesses in hand rather than hoped-for ones
            cheap = [w for w in wanted if self.proposers[w[1].spec.method].cheap]
            dear = [w for w in wanted if not self.proposers[w[1].spec.method].cheap]
            self._guess(cheap, drafts)
            expected = [functools.partial(c.draft_length.expected_tokens, guessed=True) for _, c, _ in cheap]
            expected += [c.draft_length.expected_tokens for _, c, _ in dear]
            lengths = [len(drafts.get(seq.seq_id, ())) for seq, _, _ in cheap] + [k for _, _, k in dear]
            # sticky with a draft model: switching it on and off costs catch-ups
            cap = self.planner.choose(rows, expected, lengths, num_plain=len(decoding) - len(wanted), sticky=bool(dear))
            drafts = {seq_id: guess[:cap] for seq_id, guess in drafts.items() if cap > 0}
            wanted = [(seq, c, min(k, cap)) for seq, c, k in dear] if cap > 0 else []
        self._guess(wanted, drafts)
        return drafts

    def _guess(self, wanted: list[tuple[Sequence, _Choice, int]], drafts: dict[str, list[int]]) -> None:
        """Ask each wanted sequence's proposer for up to k guesses; non-empty ones go into ``drafts``."""
        by_method: dict[str, list[DraftRequest]] = {}
        for seq, c, k in wanted:
            by_method.setdefault(c.spec.method, []).append(DraftRequest(seq.seq_id, seq.prompt_ids + seq.output_ids, k))
        for method, requests in by_method.items():
            guesses = self.proposers[method].propose(requests)
            for request, tokens in zip(requests, guesses, strict=True):
                self._choices[request.seq_id].draft_length.proposed(len(tokens))
                if tokens:
                    drafts[request.seq_id] = list(tokens[: request.num_tokens])

    def _forget_drafts(self, seq: Sequence) -> None:
        for proposer in self.proposers.values():
            proposer.forget(seq.seq_id)

    def _verify(self, c: _Choice, draft: list[int], logits: torch.Tensor, now: float, events: list[Event]) -> None:
        """Emit what one speculative chunk yields: logits [len(draft) + 1, V] at its positions, guesses kept one by
        one (each token is appended before the next position is judged, so penalties and stops see it as if
        sampled alone), up to the first rejection, a stop, or the bonus token after the last guess."""
        accepted = 0
        for i in range(len(draft) + 1):
            guess = draft[i] if i < len(draft) else None
            token = verify_token(logits[i : i + 1], c.sampling, guess)
            kept = guess is not None and int(token.token_id) == guess
            if kept:
                self.scheduler.accept_draft_token(c.seq)
                accepted += 1
            self._on_token(c, token, now, events)
            if c.finished or not kept:
                break
        self.scheduler.discard_draft_pages(c.seq)
        if c.draft_length is not None:
            c.draft_length.update(len(draft), accepted)
        self.acceptance_prior.update(c.spec.method, len(draft), accepted)
        self.metrics.spec_decode_verified(c.spec.method, len(draft), accepted)

    # -- one forward --------------------------------------------------------------------------------------------------
    def _forward_and_sample(self, plan: StepPlan, events: list[Event]) -> None:
        """Run the plan's forward, then emit every sampling sequence's token(s): one plain draw per sequence without
        guesses, all in one batch; a verification per sequence with guesses."""
        graph_step = self._graph_batch(plan)
        with torch.inference_mode():
            if graph_step is not None:
                batch, first_rows = graph_step
                assert self.decode_graphs is not None
                logits = self.decode_graphs.forward(batch)
                self.metrics.decode_graph_steps.inc()
            else:
                batch, first_rows = build_batch(plan.scheduled, self.device), _logits_rows(plan)
                logits = self.model.forward(batch, self.cache)
            plain: list[tuple[_Choice, int]] = []
            speculative: list[tuple[_Choice, ScheduledSeq, int]] = []
            for item, row in zip(plan.scheduled, first_rows, strict=True):
                if not item.samples:
                    continue
                c = self._choices[item.seq.seq_id]
                if item.draft_ids:
                    speculative.append((c, item, row))
                else:
                    plain.append((c, row))
            rows = [r for _, r in plain]
            every_row = rows == list(range(logits.shape[0]))
            plain_logits = logits if every_row else logits[rows]  # no copy when every row is sampled as it is
            tokens = sample(plain_logits, [c.sampling for c, _ in plain]) if plain else []
            now = time.monotonic()
            for (c, _), token in zip(plain, tokens, strict=True):
                self._on_token(c, token, now, events)
            for c, item, start in speculative:
                self._verify(c, item.draft_ids, logits[start : start + 1 + len(item.draft_ids)], now, events)

    def _graph_batch(self, plan: StepPlan) -> tuple[ForwardBatch, list[int]] | None:
        """The step as a graph takes it, with each sequence's first logits row, or None to run it eagerly.

        Decode steps qualify when every sequence samples from its last known token (plus its guesses, if any): a
        sequence with fewer guesses than the longest is padded with copies of its last token whose K/V go to the
        scratch slot and whose logits are never read. Steps with prompt chunks (and no guesses) qualify when their
        chunks, padded the same way to one prompt bucket, fit the graphs' prompt_tokens; they get the logits of
        each sequence's last real token."""
        graphs = self.decode_graphs
        if graphs is None:
            return None
        q = max(i.query_len for i in plan.scheduled)
        logits_rows = None  # decode: every row's (build_batch's default for padded chunks)
        if _decode_only(plan):
            if q > graphs.max_query:
                return None
            first_rows = [q * i for i in range(len(plan.scheduled))]
        else:
            if any(i.draft_ids for i in plan.scheduled) or not graphs.prompt_fits(len(plan.scheduled), q):
                return None
            q = prompt_query_bucket(q)
            logits_rows = [q * i + item.query_len - 1 for i, item in enumerate(plan.scheduled)]
            first_rows = list(range(len(plan.scheduled)))
        chunks = [padded_chunk(item, q, graphs.scratch_slot) for item in plan.scheduled]
        batch = build_batch(chunks, self.device, logits_rows=logits_rows)
        return (batch, first_rows) if graphs.eligible(batch) else None

    # -- per token ----------------------------------------------------------------------------------------------------
    def _on_token(self, c: _Choice, token: SampledToken, now: float, events: list[Event]) -> None:
        r = self._requests[c.request_id]
        p = r.req.params
        tok = int(token.token_id)
        c.seq.output_ids.append(tok)
        self.metrics.generation_tokens.inc()
        if r.first_token_at is None:
            r.first_token_at = now
            self.metrics.time_to_first_token.observe(now - r.arrival)
            self.metrics.prompt_tokens.inc(len(r.req.prompt_ids))
            if r.first_scheduled_at is not None:
                self.metrics.request_prefill_time.observe(now - r.first_scheduled_at)
        if c.last_token_at is not None:
            self.metrics.inter_token_latency.observe(now - c.last_token_at)
        c.last_token_at = r.last_token_at = now

        finish_reason: str | None = None
        stop_reason: str | int | None = None
        if tok in p.stop_token_ids or (tok in self.eos_token_ids and not p.ignore_eos):
            # a stop token ends the choice; its own text is never emitted
            token_ids: list[int] = []
            text, matched = c.stop.push(c.detok.flush())
            finish_reason, stop_reason = "stop", matched or (tok if tok in p.stop_token_ids else None)
            if matched is None:
                text += c.stop.flush()
        else:
            token_ids = [tok]
            text, matched = c.stop.push(c.detok.push(tok))
            if matched is not None:
                finish_reason, stop_reason = "stop", matched
            elif len(c.seq.output_ids) >= c.seq.max_tokens:
                tail, matched = c.stop.push(c.detok.flush())
                text += tail
                if matched is not None:
                    finish_reason, stop_reason = "stop", matched
                else:
                    finish_reason = "length"
                    text += c.stop.flush()
        if text or token_ids:
            logprobs = [self._logprob_entry(token)] if token_ids and (p.logprobs or p.top_logprobs) else None
            events.append(
                (r.req.id, {"type": wire.EVENT_DELTA, "index": c.index, "text": text, "token_ids": token_ids,
                            "logprobs": logprobs})
            )  # fmt: skip
        if finish_reason is not None:
            self._finish(r, c, finish_reason, stop_reason, events)

    def _logprob_entry(self, token: SampledToken) -> dict[str, Any]:
        text, raw = self._token_piece(int(token.token_id))
        top = [[self._token_piece(int(t))[0], int(t), float(lp)] for t, lp in token.top]
        return {"token": text, "id": int(token.token_id), "logprob": float(token.logprob), "bytes": raw, "top": top}

    def _token_piece(self, token_id: int) -> tuple[str, list[int]]:
        """One token's own text and bytes (cached: the vocabulary is fixed)."""
        piece = self._token_pieces.get(token_id)
        if piece is None:
            raw = token_bytes(self.tokenizer.tokenizer, token_id)
            piece = self._token_pieces[token_id] = (raw.decode("utf-8", errors="replace"), list(raw))
        return piece

    # -- finishing ----------------------------------------------------------------------------------------------------
    def _release(self, c: _Choice) -> None:
        c.finished = True
        self.scheduler.finish(c.seq)
        self._forget_drafts(c.seq)
        del self._choices[c.seq.seq_id]
        self._freed_seqs += 1
        with self._cond:
            self._num_live_seqs -= 1
            self.successors.ended(time.monotonic(), 1)

    def _finish(self, r: _Request, c: _Choice, reason: str, stop_reason: str | int | None, events: list[Event]) -> None:
        self._release(c)
        self.metrics.request_success(reason)
        events.append(
            (r.req.id, {"type": wire.EVENT_FINISH, "index": c.index, "finish_reason": reason,
                        "completion_tokens": len(c.seq.output_ids), "stop_reason": stop_reason})
        )  # fmt: skip
        if r.finished:
            events.append((r.req.id, self._done_event(r)))
            del self._requests[r.req.id]

    def _done_event(self, r: _Request) -> dict[str, Any]:
        now = time.monotonic()
        prompt_tokens = len(r.req.prompt_ids)
        completion_tokens = sum(len(c.seq.output_ids) for c in r.choices)
        self.metrics.e2e_request_latency.observe(now - r.arrival)
        if r.first_token_at is not None and r.last_token_at is not None:
            self.metrics.request_decode_time.observe(r.last_token_at - r.first_token_at)
        return {
            "type": wire.EVENT_DONE,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "timings": {
                "queue_s": (r.first_scheduled_at or now) - r.arrival,
                "ttft_s": None if r.first_token_at is None else r.first_token_at - r.arrival,
                "total_s": now - r.arrival,
            },
            "worker_id": self.cfg.worker_id,
        }

    def _update_gauges(self) -> None:
        self.metrics.num_requests_running.set(len(self.scheduler.running))
        self.metrics.num_requests_waiting.set(len(self.scheduler.waiting))
        self.metrics.kv_cache_usage_perc.set(self.scheduler.kv_usage)
        self.metrics.kv_cache_free_pages.set(self.scheduler.num_free_pages)
        self.metrics.decode_graphs.set(self._num_graphs())


def _error(code: str, message: str) -> dict[str, Any]:
    return {"type": wire.EVENT_ERROR, "message": message, "code": code}


# -- sizing -----------------------------------------------------------------------------------------------------------
def _logits_rows(plan: StepPlan) -> list[int]:
    """Each scheduled sequence's first logits row in an eager forward (build_batch gives each its num_logits)."""
    rows, next_row = [], 0
    for item in plan.scheduled:
        rows.append(next_row)
        next_row += item.num_logits
    return rows


def _decode_only(plan: StepPlan) -> bool:
    """Every sequence of the step samples from its last known token (plus its guesses): no prompt chunk in it."""
    return all(i.samples and i.query_len == 1 + len(i.draft_ids) for i in plan.scheduled)


def _decode_graphs_mode(mode: str, device: torch.device, model: Any) -> str:
    """What ``EngineConfig.decode_graphs`` means here: "auto" captures only on CUDA, for models that allow it."""
    if mode not in ("auto", "off", "static"):
        raise ValueError(f"decode_graphs must be auto, off or static, got {mode!r}")
    if mode == "auto" and (device.type != "cuda" or not graphs_supported(model)):
        return "off"
    return mode


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"TRELLIS_DEVICE={name!r} but no CUDA device is available")
    return device


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"TRELLIS_DTYPE={name!r} is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def default_kv_cache_tokens(
    device: torch.device,
    max_model_len: int,
    max_batch_size: int,
    bytes_per_token: int,
    memory_fraction: float = GPU_KV_CACHE_FRACTION,
) -> int:
    """kv_cache_tokens=0. On CUDA: ``memory_fraction`` of the free memory (pages beyond what a full batch can use
    keep prefixes cached for reuse). On CPU: a full batch of full contexts, within ~1 GiB."""
    if device.type == "cuda":
        if not 0.0 < memory_fraction <= 1.0:
            raise ValueError(f"TRELLIS_KV_CACHE_MEMORY_FRACTION must be in (0, 1], got {memory_fraction}")
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * memory_fraction) // bytes_per_token
    return min(max_model_len * max_batch_size, CPU_KV_CACHE_BYTES // bytes_per_token)


def default_draft_cache_tokens(device: torch.device, max_model_len: int, max_seqs: int, bytes_per_token: int) -> int:
    """speculative_draft_cache_tokens=0: room for ``max_seqs`` speculating sequences of full length; on CUDA within
    ``GPU_DRAFT_CACHE_FRACTION`` of the free memory (the target's cache, sized after, takes its share of the rest), on
    CPU within ~1 GiB."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return min(max_model_len * max_seqs, int(free * GPU_DRAFT_CACHE_FRACTION) // bytes_per_token)
    return default_kv_cache_tokens(device, max_model_len, max_seqs, bytes_per_token)


def load_draft_proposer(
    settings: Settings,
    target_id: str,
    target_config: Any,
    device: torch.device,
    dtype: torch.dtype,
    max_model_len: int,
) -> DraftModelProposer:
    """The draft model ``settings.speculative_draft_model`` on the target's device and dtype, with its own KV cache.
    ValueError when it is missing or its vocabulary differs from the target's (its guesses would be other tokens)."""
    from inference_worker.loader import load_model
    from shared.model_dir import load_config

    draft_id = settings.speculative_draft_model
    draft_dir = Path(settings.models_dir) / draft_id
    if not draft_dir.is_dir():
        raise ValueError(f"TRELLIS_SPECULATIVE_DRAFT_MODEL={draft_id!r}: no model directory {draft_dir}")
    vocab_size = load_config(draft_dir).get("vocab_size")  # checked before any weight is read
    if vocab_size is not None and int(vocab_size) != int(target_config.vocab_size):
        raise ValueError(
            f"TRELLIS_SPECULATIVE_DRAFT_MODEL={draft_id!r} has a vocabulary of {vocab_size} tokens but the served "
            f"model {target_id!r} has {target_config.vocab_size}: a draft model must use the same tokenizer"
        )
    model, config = load_model(draft_dir, device, dtype)  # a config without vocab_size is refused here
    bytes_per_token = kv_bytes_per_token(config.num_hidden_layers, config.num_key_value_heads, config.head_dim, dtype)
    max_seqs = min(settings.max_batch_size, settings.speculative_max_batch)
    cache_tokens = settings.speculative_draft_cache_tokens or default_draft_cache_tokens(
        device, max_model_len, max_seqs, bytes_per_token
    )
    log.info("draft model %s for %s: %d KV cache tokens", draft_id, target_id, cache_tokens)
    graphs = "auto" if settings.cuda_graphs and device.type == "cuda" and graphs_supported(model) else "off"
    return DraftModelProposer(
        model,
        config,
        cache_tokens,
        settings.kv_page_size,
        device,
        dtype,
        max_batch_tokens=settings.max_batch_tokens,
        graphs=graphs,
        max_seqs=max_seqs,
        max_model_len=max_model_len,
    )


def _model_dtype(model: Any) -> torch.dtype:
    """The dtype the model computes in (its first floating-point tensor), which the KV cache stores."""
    tensors = [*model.parameters(), *model.buffers()] if isinstance(model, torch.nn.Module) else []
    return next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)


def _gpt2_byte_decoder() -> dict[str, int]:
    """Byte-level BPE writes each byte as a printable character (GPT-2's table); this maps them back."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


_BYTE_DECODER = _gpt2_byte_decoder()


def token_bytes(tokenizer: tokenizers.Tokenizer, token_id: int) -> bytes:
    """The exact bytes one token stands for (a piece of a UTF-8 character stays a piece, as OpenAI's logprobs show)."""
    piece = tokenizer.id_to_token(token_id) or ""
    if isinstance(tokenizer.decoder, tokenizers.decoders.ByteLevel) and all(c in _BYTE_DECODER for c in piece):
        return bytes(_BYTE_DECODER[c] for c in piece)
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte fallback
        return bytes([int(piece[3:5], 16)])
    return tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")


# -- the model thread -------------------------------------------------------------------------------------------------
class EngineLoop:
    """Runs ``engine.step()`` on a dedicated thread, sleeping when idle, and hands events to ``on_events``."""

    IDLE_WAIT_S = 0.5

    def __init__(self, engine: Engine, on_events: Callable[[list[Event]], None]) -> None:
        self.engine = engine
        self.on_events = on_events
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Step on a thread of its own."""
        if self._thread is not None:
            raise RuntimeError("EngineLoop already started")
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def run(self) -> None:
        """Step on the calling thread until ``stop()`` (the worker's main thread: on CPU, torch's OpenMP ops ran a
        third slower on a secondary thread than on the main one)."""
        self._run()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish the current step, then end the loop (and wait for its thread, if it has one)."""
        self._stopping.set()
        self.engine.wake()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("engine loop did not stop within %s s", timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stopping.is_set():
            if not self.engine.wait_for_work(self.IDLE_WAIT_S):
                continue
            try:
                events = self.engine.step()
            except Exception as exc:  # one bad step must not leave clients hanging: end their requests
                log.exception("engine step failed")
                events = self.engine.fail_all(f"inference failed: {type(exc).__name__}: {exc}")
            if events:
                try:
                    self.on_events(events)
                except Exception:
                    log.exception("delivering %d events failed", len(events))
            self.engine.linger()
