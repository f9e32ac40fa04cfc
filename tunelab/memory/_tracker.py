"""Exact tensor accounting: every live storage with its bytes and role, and the peak over a step.

A `TorchDispatchMode` sees every tensor an op returns (forward, backward and optimizer ops alike);
a weak reference on each storage tells us when it is freed. Storages are keyed by their data pointer,
so views and in-place results are counted once. Each storage carries a role: weights, gradients,
optimizer, input (registered before the step), or the phase that created it (activations or logits
in the forward pass, backward, step). `saved_tensors_hooks`
additionally records which storages autograd saved for backward.
"""

from __future__ import annotations

import weakref
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensors(TorchDispatchMode):
    """Track live storages by role; `peak` is the largest total seen after any op.

    vocab_size: tensors whose last dimension equals it are tagged `logits` (logits, their fp32
    upcast, log-softmax and their gradients) instead of the current phase's role.
    """

    def __init__(self, vocab_size: int | None = None):
        super().__init__()
        self.vocab_size = vocab_size
        self.phase = "temp"
        self._bytes: dict[int, int] = {}
        self._role: dict[int, str] = {}
        self._refs: dict[int, weakref.ref] = {}
        self.by_role: dict[str, int] = defaultdict(int)
        self.total = 0
        self.peak = 0
        self.peak_by_role: dict[str, int] = defaultdict(int)  # per-role maxima (not simultaneous)
        self.at_peak: dict[str, int] = {}  # role breakdown at the moment of the overall peak
        self.saved: set[int] = set()

    # --- registration -------------------------------------------------------------------------
    def add(self, t: torch.Tensor, role: str | None = None) -> None:
        """Count `t`'s storage (once) under `role` (default: the phase's role for new storages)."""
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        st = t.untyped_storage()
        key, nbytes = st.data_ptr(), st.nbytes()
        if key == 0 or nbytes == 0:
            return
        if key in self._bytes:
            if role is not None and self._role[key] != role:  # re-tag (e.g. a backward temp became .grad)
                self.by_role[self._role[key]] -= self._bytes[key]
                self._role[key] = role
                self.by_role[role] += self._bytes[key]
            return
        if role is None:
            role = "logits" if self._is_vocab(t) and self.phase in ("activations", "backward") else self.phase
        self._bytes[key], self._role[key] = nbytes, role
        self._refs[key] = weakref.ref(st, lambda _, k=key: self._free(k))
        self.by_role[role] += nbytes
        self.total += nbytes
        self._update()

    def _is_vocab(self, t: torch.Tensor) -> bool:
        return self.vocab_size is not None and t.dim() >= 1 and t.shape[-1] == self.vocab_size

    def _free(self, key: int) -> None:
        nbytes = self._bytes.pop(key, 0)
        role = self._role.pop(key, None)
        self._refs.pop(key, None)
        self.saved.discard(key)
        if role is not None:
            self.by_role[role] -= nbytes
            self.total -= nbytes

    def _update(self) -> None:
        for role, b in self.by_role.items():
            if b > self.peak_by_role[role]:
                self.peak_by_role[role] = b
        if self.total > self.peak:
            self.peak = self.total
            self.at_peak = dict(self.by_role)

    def live(self, roles: tuple[str, ...] | None = None) -> int:
        """Bytes alive now, in all roles or the given ones."""
        if roles is None:
            return self.total
        return sum(b for r, b in self.by_role.items() if r in roles)

    def saved_bytes(self, roles: tuple[str, ...] = ("activations", "logits")) -> int:
        """Bytes of live storages autograd saved for backward, in the given roles."""
        return sum(self._bytes[k] for k in self.saved if self._role.get(k) in roles)

    def reset_peaks(self) -> None:
        self.peak = self.total
        self.peak_by_role = defaultdict(int, self.by_role)
        self.at_peak = dict(self.by_role)

    # --- hooks ---------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out

    def saved_hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        """Hooks that record the storages autograd saves for backward (the tensors pass through)."""

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.device.type != "meta":
                key = t.untyped_storage().data_ptr()
                if key in self._bytes:
                    self.saved.add(key)
            return t

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
