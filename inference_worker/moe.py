"""A sparse mixture-of-experts MLP: a router picks top-k experts per token, their outputs are mixed by its weights.

Experts are ordinary SwiGLU MLPs built from ``Linear``s, so each expert is dense or EXL3 exactly as the checkpoint
stores it. Execution is grouped: the (token, expert) pairs of the whole batch are sorted by expert, and each expert
that got any tokens runs once over its contiguous slice (one matmul per linear per expert group, never a loop over
tokens). The router is a plain dense matrix: it is tiny, and quantizing it would change which experts run.

Grouping needs the group sizes on the host, which a CUDA graph cannot wait for. While a graph is being captured
(decode steps, inference_worker/cuda_graphs.py) every expert instead runs over every token, weighted by the token's
routing weight for it (zero when it was not picked): no host sync, and a decode batch of a few dozen tokens reads
most experts' weights anyway.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SparseMoe(nn.Module):
    """x [T, hidden] -> [T, hidden]: sum over the token's top-k experts of weight * expert(x), plus a shared expert."""

    def __init__(
        self,
        router: torch.Tensor,
        experts: list[nn.Module],
        top_k: int,
        norm_topk_prob: bool,
        shared_expert: nn.Module | None = None,
        shared_expert_gate: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if router.dim() != 2 or router.shape[0] != len(experts):
            raise ValueError(f"router weight must be [{len(experts)} experts, hidden], got {tuple(router.shape)}")
        if not 1 <= top_k <= len(experts):
            raise ValueError(f"top_k must be between 1 and the number of experts ({len(experts)}), got {top_k}")
        if shared_expert_gate is not None and shared_expert is None:
            raise ValueError("a shared_expert_gate needs a shared_expert to gate")
        self.router = nn.Parameter(router, requires_grad=False)
        self.experts = nn.ModuleList(experts)
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_expert_gate

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, top_k] float32, expert ids [T, top_k] int64): softmax over all experts, then the top k.

        Logits come out in the model's dtype (as the reference implementations compute them); the softmax and the
        weights are float32 so close experts are ranked the same way at any precision of the activations."""
        probs = F.linear(x, self.router).float().softmax(dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = self.route(x)
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        run = self.run_every_expert if capturing else self.run_experts
        return self.add_shared(x, run(x, weights, experts))

    def add_shared(self, x: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        """``routed`` plus the shared expert's output for x (gated where the family gates it), if there is one."""
        if self.shared_expert is None:
            return routed
        shared = self.shared_expert(x)
        if self.shared_expert_gate is not None:
            shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
        return routed + shared

    def run_experts(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """sum_k weights[t, k] * expert_{experts[t, k]}(x[t]) for every token t, grouped by expert."""
        pair_expert = experts.flatten()  # [T * top_k], pair p belongs to token p // top_k
        order = torch.argsort(pair_expert, stable=True)  # pairs of expert 0 first, then expert 1, ...
        token_of_pair = order // self.top_k
        # Group sizes decide the slices, so they come to the host: one sync per MoE layer, not one per expert.
        group_sizes = torch.bincount(pair_expert, minlength=self.num_experts).tolist()
        groups = x[token_of_pair].split(group_sizes)
        outputs = torch.cat(
            [expert(rows) for expert, rows in zip(self.experts, groups, strict=True) if rows.shape[0]]
        )  # [T * top_k, hidden] in the sorted pair order
        mixed = (outputs.float() * weights.flatten()[order, None]).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token_of_pair, mixed)

    def run_every_expert(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """What ``run_experts`` computes, without the host: every expert over every token, weighted by the token's
        routing weight for it (zero for experts it did not pick)."""
        dense = torch.zeros(x.shape[0], self.num_experts, dtype=torch.float32, device=x.device)
        dense.scatter_(1, experts, weights)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e, expert in enumerate(self.experts):
            out += expert(x).float() * dense[:, e : e + 1]
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        shared = ", shared expert" + (" (gated)" if self.shared_expert_gate is not None else "")
        return f"experts={self.num_experts}, top_k={self.top_k}, norm_topk_prob={self.norm_topk_prob}" + (
            shared if self.shared_expert is not None else ""
        )
