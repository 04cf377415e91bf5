"""The paged KV cache: fixed-size pages of keys and values, handed out to sequences by the scheduler.

A token's K/V live at a *slot* ``page * page_size + offset``; a sequence reads its context through its block table
(the list of its pages in order). Pages are plain tensor rows, so freeing or sharing a prefix never copies data.

Keys and values are stored independently either unquantized, in the model's dtype (``TRELLIS_KV_BITS=fp16``, the
default), or quantized to 2..8 bits per value (``TRELLIS_KV_BITS=K,V``, see kernels/kv_quant_ref.py). A layer's keys
are a tensor ``[pages, page_size, kv_heads, head_dim]`` or a ``QuantPages``; the attention code reads either. On CUDA
the fused Triton kernel (kernels/kv_quant.py) quantizes on append; elsewhere the torch reference does.
"""

from __future__ import annotations

import torch

from kernels import kv_quant_ref
from kernels.kv_quant_ref import QuantPages

KVBits = tuple[int | None, int | None]  # (key bits, value bits); None: unquantized in the model dtype
UNQUANTIZED = ("fp16", "bf16", "fp32", "none", "")


def parse_kv_bits(text: str) -> KVBits:
    """``TRELLIS_KV_BITS``: "fp16" (unquantized), "K,V" with each 2..8 or fp16 (e.g. "4,4", "8,fp16"), or one width
    for both ("4")."""
    parts = [p.strip().lower() for p in text.split(",")]
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise ValueError(f"TRELLIS_KV_BITS={text!r}: expected 'fp16', 'K,V' (e.g. '4,4') or one width for both")
    bits: list[int | None] = []
    for name, part in zip(("key", "value"), parts, strict=True):
        if part in UNQUANTIZED:
            bits.append(None)
            continue
        try:
            value = int(part)
        except ValueError:
            raise ValueError(
                f"TRELLIS_KV_BITS={text!r}: the {name} width {part!r} is neither fp16 nor an integer"
            ) from None
        kv_quant_ref.check_bits(value, f"TRELLIS_KV_BITS={text!r}: {name}")
        bits.append(value)
    return bits[0], bits[1]


def format_kv_bits(bits: KVBits) -> str:
    return ",".join("fp16" if b is None else str(b) for b in bits)


def _side_bytes(num_kv_heads: int, head_dim: int, dtype: torch.dtype, bits: int | None) -> float:
    if bits is None:
        return num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
    return num_kv_heads * head_dim * kv_quant_ref.quant_bytes_per_value(bits)


def kv_bytes_per_token(
    num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, kv_bits: KVBits = (None, None)
) -> int:
    """Cache bytes one token occupies across all layers (K and V), for sizing the cache before allocating it."""
    k_bits, v_bits = kv_bits
    per_layer = _side_bytes(num_kv_heads, head_dim, dtype, k_bits) + _side_bytes(num_kv_heads, head_dim, dtype, v_bits)
    return int(num_layers * per_layer)


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
        kv_bits: KVBits = (None, None),
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
        self.kv_bits = kv_bits

        def pages(bits: int | None) -> torch.Tensor | QuantPages:
            if bits is None:
                return torch.zeros((num_pages, page_size, num_kv_heads, head_dim), dtype=dtype, device=self.device)
            return kv_quant_ref.empty_quant_pages(num_pages, page_size, num_kv_heads, head_dim, bits, self.device)

        # One set of pages per layer so a layer's pages are contiguous for the attention kernel.
        self.k: list[torch.Tensor | QuantPages] = [pages(kv_bits[0]) for _ in range(num_layers)]
        self.v: list[torch.Tensor | QuantPages] = [pages(kv_bits[1]) for _ in range(num_layers)]
        # Per layer, a [kv_heads, head_dim] vector subtracted from every key before it is stored (key_centering.py):
        # attention is blind to a shift shared by all keys, and quantized keys lose less with it removed.
        self.key_offsets: list[torch.Tensor] | None = None
        # Per layer, [kv_heads, head_dim] divisors applied after the offset; attention multiplies queries by them.
        self.key_scales: list[torch.Tensor] | None = None

    @property
    def num_slots(self) -> int:
        return self.num_pages * self.page_size

    @property
    def nbytes(self) -> int:
        """Device memory the pages hold (codes and scales of quantized sides)."""
        sides = [*self.k, *self.v]
        return sum(p.codes.nbytes + p.scales.nbytes if isinstance(p, QuantPages) else p.nbytes for p in sides)

    def bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype, self.kv_bits)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store k, v [T, num_kv_heads, head_dim] of T new tokens at their slots [T] (quantizing where asked)."""
        expected = (slot_mapping.shape[0], self.num_kv_heads, self.head_dim)
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise ValueError(f"k/v must have shape {expected}, got {tuple(k.shape)} and {tuple(v.shape)}")
        if self.key_offsets is not None:
            k = k - self.key_offsets[layer]
        if self.key_scales is not None:
            k = k / self.key_scales[layer]
        for pages, x in ((self.k[layer], k), (self.v[layer], v)):
            if isinstance(pages, QuantPages):
                if self.device.type == "cuda":
                    from kernels import kv_quant  # triton compiles only where it runs

                    kv_quant.quantize_append(pages, x, slot_mapping)  # the fused Triton append
                else:
                    kv_quant_ref.write_pages_ref(pages, x, slot_mapping)
            else:
                flat = pages.view(self.num_slots, self.num_kv_heads, self.head_dim)
                flat.index_copy_(0, slot_mapping, x.to(self.dtype))
