"""A cheaper dropout for LoRA's input on CPUs: the same inverted dropout, with a faster random mask.

PEFT applies `nn.Dropout(p)` to the input of every LoRA adapter (7 per layer with attention+MLP
targets). On a CPU, `bernoulli_` draws one 32-bit random number per element from a single-threaded
generator: for the bundled model at 3k tokens per micro-batch that is ~15 ms a call and ~20% of a
training step. Here each 64-bit word gives four 15-bit uniforms (the low 15 bits of each 16-bit lane), so
the mask costs ~6x less; the drop probability is p rounded to a multiple of 1/32768. On a CPU the words come
from numpy's SFC64 generator, seeded from torch's (so `torch.manual_seed` and saved RNG states still decide
every mask): 0.61 ms for 335k words here, where torch's mt19937 `random_` takes 1.17 ms. No library offers
the mask itself, so it is written here.
"""

from __future__ import annotations

import numpy as np
import torch


def random_words(n: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n,) int64 of random bits (at least the low 63 of each word), decided by torch's `generator`.

    On a CPU one 62-bit seed is drawn from torch's generator and numpy's SFC64 fills the words (~2x faster than
    torch's mt19937 here); elsewhere torch's own `random_`."""
    if torch.device(device).type != "cpu":
        return torch.empty(n, dtype=torch.int64, device=device).random_(generator=generator)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    return torch.from_numpy(np.random.SFC64(seed).random_raw(n).view(np.int64))


def _drop_lanes(n: int, p: float, device, generator: torch.Generator | None) -> torch.Tensor:
    """(8 * ceil(n / 8),) int16: -1 where dropped (probability round(p * 32768) / 32768), 0 where kept.

    Each 64-bit word gives four 15-bit uniforms (the low 15 bits of each 16-bit lane; a lane's top bit is not
    used); a lane minus the threshold, arithmetically shifted right by 15, is -1 or 0. Lanes past n pad to
    whole bytes for `pack_drops`."""
    lanes = random_words((n + 7) // 8 * 2, device, generator).view(torch.int16)
    return lanes.bitwise_and_(0x7FFF).sub_(round(p * 32768)).bitwise_right_shift_(15)


def keep_mask(shape: torch.Size, p: float, device: torch.device | str = "cpu",
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool mask of `shape`, each element False (dropped) with probability round(p * 32768) / 32768."""
    return (_drop_lanes(shape.numel(), p, device, generator)[:shape.numel()] == 0).view(shape)


_ONES = {torch.bfloat16: 0x3F80, torch.float16: 0x3C00}  # the bit pattern of 1.0 in 16-bit floats


def _keep_from_lanes(lanes: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    lanes = lanes[:x.numel()]
    if x.dtype in _ONES:
        return lanes.bitwise_not().bitwise_and_(_ONES[x.dtype]).view(x.dtype).view(x.shape)
    return lanes.add(1).to(x.dtype).view(x.shape)


def keep_mask_as(x: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """`keep_mask` (the same draws) as 1 (kept) / 0 (dropped) in x's dtype, built with integer ops only.

    On this CPU an op that reads or writes a bool tensor (a comparison, `where`, `masked_fill`) costs ~6x a
    bf16 multiply, so dropout as `x * mask` with a 16-bit float mask is the cheap form; for bf16/fp16 the
    bits of 1.0 are masked in directly."""
    return _keep_from_lanes(_drop_lanes(x.numel(), p, x.device, generator), x)


def keep_mask_packed_as(x: torch.Tensor, p: float,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(`keep_mask_as(x, p)`, the same mask packed eight elements to a byte) from one set of draws.

    The packed form is what a backward pass keeps: 1 bit per element where the mask in x's dtype takes 16
    (7 LoRA inputs per layer: ~25% of a LoRA step's activations at 2 bytes). `unpack_keep_as` restores it."""
    lanes = _drop_lanes(x.numel(), p, x.device, generator)
    return _keep_from_lanes(lanes, x), pack_drops(lanes)


_BIT = [1 << j for j in range(8)]


def pack_drops(lanes: torch.Tensor) -> torch.Tensor:
    """(8 m,) int16 lanes (-1 dropped, 0 kept) -> (m,) uint8, bit j of byte i set when element 8 i + j dropped."""
    by = lanes.view(-1, 8)  # (m, 8)
    bits = by[:, 0].bitwise_and(1)  # (m,) int16; eight strided passes over m beat a reduction over 8
    for j in range(1, 8):
        bits.bitwise_or_(by[:, j].bitwise_and(_BIT[j]))
    return bits.to(torch.uint8)


_TABLES: dict[tuple, torch.Tensor] = {}


def unpack_keep_as(bits: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of `pack_drops` as a keep mask: 1 (kept) / 0 (dropped) in `dtype`, of `shape`.

    One gather from a (256, 8) table of every byte's eight mask values (~1 ms for 3M elements here, where
    shifting and masking the bits out takes ~3x that)."""
    key = (dtype, bits.device)
    if key not in _TABLES:
        byte = torch.arange(256, device=bits.device)[:, None]
        _TABLES[key] = (byte.bitwise_right_shift(torch.arange(8, device=bits.device)) & 1 == 0).to(dtype)
    n = shape.numel()
    return _TABLES[key].index_select(0, bits.to(torch.int32)).view(-1)[:n].view(shape)


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p: float):
        keep = keep_mask(x.shape, p, x.device)
        ctx.save_for_backward(keep)  # 1 byte per element, like nn.Dropout's mask
        ctx.scale = 1.0 / (1.0 - p)
        return torch.where(keep, x * ctx.scale, 0)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad * ctx.scale, 0), None


class FastDropout(torch.nn.Dropout):
    """`nn.Dropout` with `keep_mask`; identical in eval mode and for p = 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        return _Dropout.apply(x, self.p)


def use_fast_dropout(model: torch.nn.Module) -> int:
    """Turn every `nn.Dropout` of PEFT's LoRA layers (`lora_dropout`) into a `FastDropout`; returns how many."""
    n = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, torch.nn.ModuleDict):
            continue
        for name, d in drops.items():
            if type(d) is torch.nn.Dropout:
                drops[name] = FastDropout(d.p)
                n += 1
    return n
