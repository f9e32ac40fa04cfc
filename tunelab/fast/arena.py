"""One reused block for the tensors a CPU training step keeps for backward, so the heap does not fragment.

A forward pass keeps hundreds of activations until backward, allocated between short-lived temporaries;
on glibc's heap (tunelab serves everything from it, see `cpu.py`) they leave the free space in ~20k
pieces, and the next micro-batch's tensors do not fit the holes. Measured on the bundled model with
2-row micro-batches of ~1.1k tokens: ~730 MB of activations, and resident memory kept growing, by ~800 MB
more over 16 micro-batches. Here every tensor autograd saves (but parameters) is copied into one block at
the next free offset, the block is reused by every micro-batch (grown to the largest one's need), and the
heap's free pages go back to the system after each backward. In `bench/train_throughput.py` (2-row
micro-batches) peak RSS went from 2,327 to 1,844 MiB at the same speed. torch has no CPU caching
allocator to plug in and jemalloc is not a pip dependency, so this is written here.
"""

from __future__ import annotations

import contextlib
import weakref

import torch

from tunelab.fast.cpu import no_huge_pages, release_free_memory

ALIGN = 64  # bytes: every copy starts on a cache line, a multiple of every element size


class ActivationArena:
    """`with arena.saving(): loss = ...` keeps backward's tensors in the arena; `arena.release()` after backward.

    A storage saved several times (views of one tensor: q, k and v read the same normed input) is copied
    once. A tensor that does not fit stays where it is, and the block grows at the next release."""

    def __init__(self, model: torch.nn.Module):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.block: torch.Tensor | None = None  # (capacity,) uint8
        self.need = 0  # bytes this round would have needed
        self.seen: dict[int, tuple] = {}  # storage data_ptr -> (weakref to it, byte offset, in the block)

    @property
    def capacity(self) -> int:
        return 0 if self.block is None else self.block.numel()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "cpu" or t.layout != torch.strided:
            return t
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr in self.params or ptr == 0:
            return t
        hit = self.seen.get(ptr)
        if hit is not None and hit[0]() is s:
            offset, fits = hit[1], hit[2]
        else:
            n = s.nbytes()
            if n > 8 * max(1, t.numel() * t.element_size()) and n > 2**20:  # a small view of a big storage
                return t
            offset = self.need
            self.need += -(-n // ALIGN) * ALIGN
            fits = self.need <= self.capacity  # counted once either way, so the next block is the right size
            if fits:
                self.block[offset:offset + n].copy_(torch.empty(0, dtype=torch.uint8).set_(s))
            self.seen[ptr] = (weakref.ref(s), offset, fits)
        if not fits:
            return t
        size = t.element_size()
        return torch.empty(0, dtype=t.dtype).set_(self.block.untyped_storage(), offset // size + t.storage_offset(),
                                                  t.size(), t.stride())

    @contextlib.contextmanager
    def saving(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield

    def release(self) -> None:
        """Backward is done with this micro-batch's tensors: reuse the block, grown to this round's need."""
        if self.need > self.capacity:
            self.block = None  # freed before the bigger one is allocated
        release_free_memory()  # the temporaries' pages: the next micro-batch faults in only what it uses
        if self.block is None and self.need:
            self.block = torch.empty(self.need + self.need // 8, dtype=torch.uint8)
            no_huge_pages(self.block)  # the first micro-batch to fill it would wait for huge pages: cpu.py
        self.need = 0
        self.seen.clear()
