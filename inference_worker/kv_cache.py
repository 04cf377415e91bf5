"""The paged KV cache: fixed-size pages of keys and values, handed out to sequences by the scheduler.

A token's K/V live at a *slot* ``page * page_size + offset``; a sequence reads its context through its block table
(the list of its pages in order). Pages are plain tensor rows, so freeing or sharing a prefix never copies data.
"""

from __future__ import annotations

import torch


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Cache bytes one token occupies across all layers (K and V), for sizing the cache before allocating it."""
    return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class PagedKVCache:
    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        for name, value in (("num_layers", num_layers), ("num_pages", num_pages), ("page_size", page_size)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        self.num_layers = num_layers
        self.num_pages = num_pages
        self.page_size = page_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        # One tensor per layer so a layer's pages are contiguous for the attention kernel.
        self.k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]

    @property
    def num_slots(self) -> int:
        return self.num_pages * self.page_size

    def bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store k, v [T, num_kv_heads, head_dim] of T new tokens at their slots [T]."""
        expected = (slot_mapping.shape[0], self.num_kv_heads, self.head_dim)
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise ValueError(f"k/v must have shape {expected}, got {tuple(k.shape)} and {tuple(v.shape)}")
        flat_shape = (self.num_slots, self.num_kv_heads, self.head_dim)
        self.k[layer].view(flat_shape).index_copy_(0, slot_mapping, k.to(self.dtype))
        self.v[layer].view(flat_shape).index_copy_(0, slot_mapping, v.to(self.dtype))
