"""Many LoRA adapters on one base: PEFT adapter folders read into stacked A/B weights, applied per row.

Written by hand because PEFT's mixed-adapter batches (`adapter_names=`) loop over adapters in Python inside
every LoRA layer and gather each adapter's rows on every call; here the rows are grouped once per decoding
step (`RowGroups`) and every adapted linear layer then runs, for a few rows (decoding), two matmuls against
all adapters' A and B side by side with a per-row mask (punica's "BGMV" idea without its kernel: a few
times the LoRA FLOPs, which are tiny at decode, for no gathers), or, for many rows (prefill, whose packed
sequences the engine orders by adapter), two matmuls per adapter on its contiguous slice of rows; rows in
any other order are gathered per adapter for two batched matmuls.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.errors import TunelabError
from tunelab.runs.adapter_folder import read_adapter_folder

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MASKED_ROWS = 64  # steps with at most this many rows use the side-by-side (masked) path
MASKED_WIDTH = 256  # ... when all loaded adapters' ranks add up to at most this many columns
MAX_RUNS = 16  # steps whose rows form at most this many same-adapter runs use the sliced path


@dataclass
class LoraWeights:
    """One adapter: per (layer, module) the matrices A (r, in) and B (out, r), and its scale alpha/r."""

    name: str
    path: str
    rank: int
    scale: float
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    config: dict


def unsupported(cfg: dict) -> str | None:
    """What in a PEFT adapter config the batched engine does not run (None: a plain LoRA it runs)."""
    kind = cfg.get("peft_type")
    if kind != "LORA":
        return f"{kind} adapters"
    for key, why in (("use_dora", "DoRA"), ("modules_to_save", "modules_to_save"), ("rank_pattern", "per-module ranks"),
                     ("alpha_pattern", "per-module alphas")):
        if cfg.get(key):
            return f"{why} adapters"
    return None


def read_adapter(name: str, folder: str | Path, num_layers: int, dtype: torch.dtype,
                 device: torch.device) -> LoraWeights:
    """A PEFT LoRA folder's tensors as LoraWeights for the engine (the folder itself is read by
    tunelab.runs.adapter_folder).

    Raises TunelabError for what the engine does not run: DoRA, prompt learning, LoRA on embeddings or the
    head, modules_to_save, per-module ranks/alphas. `load_engine` then uses the generate-based engine."""
    from safetensors.torch import load_file

    adapter = read_adapter_folder(folder)
    folder, cfg = adapter.path, adapter.config
    why = unsupported(cfg)
    if why:
        raise TunelabError(f"{folder}: {why} run on the generate-based engine, not the batched one.")
    weights_file = adapter.safetensors()
    r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    scale = alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r
    state = load_file(str(weights_file))
    pat = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        m = pat.search(key)
        if m is None or m.group(2) not in TARGETS:
            raise TunelabError(f"{folder}: weight {key!r} is not a LoRA matrix on a decoder linear layer; "
                               "this adapter runs on the generate-based engine.")
        layer = int(m.group(1))
        if layer >= num_layers:
            raise TunelabError(f"{folder}: weight {key!r} names layer {layer}, the base has {num_layers}.")
        pairs.setdefault((layer, m.group(2)), {})[m.group(3)] = t.to(device=device, dtype=dtype)
    weights = {k: (v["A"], v["B"]) for k, v in pairs.items() if "A" in v and "B" in v}
    return LoraWeights(name, str(folder), r, scale, weights, cfg)


class RowGroups:
    """Which rows (tokens) of a step use which adapter, computed once per step and shared by every layer.

    One of: `single` (every row on one adapter), `mask` (few rows: all adapters side by side, masked),
    `runs` (rows in a few same-adapter runs: [(adapter, start, end, scale)], one slice each), else rows
    gathered into a (G, M) grid (G adapters present, M the most rows any of them has; padding points at row 0
    and is dropped on the way back), so one `bmm` serves all adapters."""

    def __init__(self, row_adapter: list[int], device: torch.device, slots: AdapterSlots | None = None):
        present = sorted({a for a in row_adapter if a >= 0})
        self.adapters = present
        self.single = self.mask = self.runs = None
        if not present:
            return
        members = [[i for i, a in enumerate(row_adapter) if a == g] for g in present]
        if len(present) == 1 and len(members[0]) == len(row_adapter):
            self.single = present[0]  # every row on one adapter: plain matmuls, no gathers
            return
        if slots is not None and len(row_adapter) <= MASKED_ROWS and 0 < slots.width <= MASKED_WIDTH:
            self.mask = slots.row_mask(row_adapter)  # (rows, N * r_max): the row's adapter's scale, else 0
            return
        runs = _runs(row_adapter)
        if slots is not None and len(runs) <= MAX_RUNS:
            self.runs = [(g, s, e, slots.adapters[g].scale) for g, s, e in runs]
            return
        m = max(len(x) for x in members)
        grid = [x + [0] * (m - len(x)) for x in members]
        self.grid = torch.tensor(grid, device=device).view(-1)  # (G*M,)
        valid = [g * m + j for g, x in enumerate(members) for j in range(len(x))]
        self.valid = torch.tensor(valid, device=device)  # positions in the grid that are real rows
        self.rows = torch.tensor([i for x in members for i in x], device=device)  # their row indices
        self.shape = (len(present), m)


def _runs(row_adapter: list[int]) -> list[tuple[int, int, int]]:
    """(adapter, start, end) for each run of consecutive rows on one adapter (rows on the base skipped)."""
    out, start = [], 0
    for i in range(1, len(row_adapter) + 1):
        if i == len(row_adapter) or row_adapter[i] != row_adapter[start]:
            if row_adapter[start] >= 0:
                out.append((row_adapter[start], start, i))
            start = i
    return out


class MultiLoraLinear(torch.nn.Module):
    """A base nn.Linear plus any number of LoRA adapters, each row of the batch picking its own."""

    def __init__(self, base: torch.nn.Linear, key: tuple[int, str], state: AdapterSlots):
        super().__init__()
        self.base, self.key, self.state = base, key, state

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, in); groups are over its B*T rows
        out = self.base(x)  # (B, T, out)
        groups = self.state.groups
        if groups is None or not groups.adapters:
            return out
        stack = self.state.stacks.get(self.key)
        if stack is None:
            return out
        a, b, scale, a_cat, b_cat = stack  # (N, in, r), (N, r, out), (N,), (in, N*r), (N*r, out)
        # the B product is accumulated into the base's output by `addmm_` (no (rows, out) temporary, no add
        # pass: 289 vs 417 us for 1080 rows of a 576 -> 1536 layer in bf16)
        xf, of = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])  # (rows, in), (rows, out)
        if groups.single is not None:
            g = groups.single
            of.addmm_(xf @ a[g], b[g], alpha=float(scale[g]))
            return out
        if groups.mask is not None:  # every adapter's A side by side; the mask keeps each row's own
            of.addmm_((xf @ a_cat).mul_(groups.mask), b_cat)  # (rows, N*r) @ (N*r, out)
            return out
        if groups.runs is not None:  # each adapter's rows are one slice: no gathers, no padding
            for g, s, e, sc in groups.runs:
                of[s:e].addmm_(xf[s:e] @ a[g], b[g], alpha=sc)
            return out
        G, M = groups.shape
        xs = xf.index_select(0, groups.grid).view(G, M, -1)  # (G, M, in)
        idx = self.state.present_index(groups)
        if idx is not None:  # some of the loaded adapters: their slices of the stacks
            a, b, scale = a.index_select(0, idx), b.index_select(0, idx), scale.index_select(0, idx)
        y = torch.bmm(torch.bmm(xs, a), b) * scale.view(G, 1, 1)  # (G, M, out)
        y = y.view(G * M, -1).index_select(0, groups.valid)  # (rows with an adapter, out)
        of.index_add_(0, groups.rows, y.to(of.dtype))
        return out


class AdapterSlots:
    """The adapters loaded on an engine, each in a fixed slot (its index) of per-(layer, module) stacked weights.

    An adapter keeps its slot until removed, and the next one loaded takes the lowest free slot, written in
    place: loading or evicting one adapter copies that adapter's weights only. Rebuilding every resident
    adapter's stacks on each load took ~0.5 s with 8 resident, on the engine thread, between decoding steps.
    The stacks are rebuilt only when they must grow: a slot beyond the current ones, a higher rank, a module
    not stacked yet."""

    def __init__(self, num_layers: int, dtype: torch.dtype, device: torch.device):
        self.num_layers, self.dtype, self.device = num_layers, dtype, device
        self.adapters: list[LoraWeights | None] = []  # slot -> adapter; None: a free slot
        self.stacks: dict[tuple[int, str], tuple[torch.Tensor, ...]] = {}
        self.width = 0  # slots * r_max: the columns of the side-by-side A
        self.groups: RowGroups | None = None
        self._present: tuple[tuple[int, ...], torch.Tensor | None] | None = None

    @property
    def loaded(self) -> list[LoraWeights]:
        return [a for a in self.adapters if a is not None]

    def index(self, name: str | None) -> int:
        if name is None:
            return -1
        for i, a in enumerate(self.adapters):
            if a is not None and a.name == name:
                return i
        known = ", ".join(a.name for a in self.loaded) or "none"
        raise TunelabError(f"no adapter named {name!r} is loaded (loaded: {known}).")

    def present_index(self, groups: RowGroups) -> torch.Tensor | None:
        """The stack indices of the adapters present in this step; None when every slot is (in order), so
        the layers use the stacks as they are instead of copying slices of them in every layer."""
        key = tuple(groups.adapters)
        if self._present is None or self._present[0] != key:
            full = key == tuple(range(len(self.adapters)))
            self._present = (key, None if full else torch.tensor(key, device=self.device))
        return self._present[1]

    def row_mask(self, row_adapter: list[int]) -> torch.Tensor:
        """(rows, slots * r_max): row i holds its adapter's scale over that slot's r_max columns, 0 elsewhere."""
        r = self.width // len(self.adapters)
        scale = torch.tensor([a.scale if a is not None else 0.0 for a in self.adapters], dtype=self.dtype)
        idx = torch.tensor(row_adapter)
        mask = torch.zeros(len(row_adapter), len(self.adapters), r, dtype=self.dtype)
        rows = (idx >= 0).nonzero().view(-1)
        mask[rows, idx[rows]] = scale[idx[rows]].view(-1, 1)
        return mask.view(len(row_adapter), -1).to(self.device)

    def add(self, lw: LoraWeights, slot: int | None = None) -> None:
        """Load `lw` into `slot` (the adapter manager's choice, tunelab.infer.adapters), or the lowest free one."""
        if any(a.name == lw.name for a in self.loaded):
            raise TunelabError(f"an adapter named {lw.name!r} is already loaded; remove it first.")
        free = next((i for i, a in enumerate(self.adapters) if a is None), len(self.adapters)) if slot is None else slot
        if free < len(self.adapters) and self.adapters[free] is not None:
            raise TunelabError(f"slot {free} holds adapter {self.adapters[free].name!r}; remove it first.")
        r_max = self.width // len(self.adapters) if self.adapters else 0
        self.adapters.extend([None] * (free + 1 - len(self.adapters)))
        self.adapters[free] = lw
        if free >= self._slots() or lw.rank > r_max or any(k not in self.stacks for k in lw.weights):
            self._grow()
        self._write(free)

    def remove(self, name: str) -> None:
        """Unload `name`; its slot is zeroed and free for the next adapter."""
        i = self.index(name)
        self.adapters[i] = None
        if not self.loaded:
            self.adapters = []
            self._grow()
        else:
            self._write(i)

    def _slots(self) -> int:
        return next(iter(self.stacks.values()))[0].shape[0] if self.stacks else 0

    def _write(self, i: int) -> None:
        """Copy slot i's adapter (zeros for a free slot or a module it does not adapt) into every stack."""
        a = self.adapters[i]
        r = self.width // len(self.adapters)
        for key, (A, B, scale, a_cat, _) in self.stacks.items():
            A[i].zero_()
            B[i].zero_()
            scale[i] = a.scale if a is not None else 0.0
            if a is not None and key in a.weights:
                wa, wb = a.weights[key]  # (r, in), (out, r)
                A[i, :, :a.rank] = wa.t()
                B[i, :a.rank, :] = wb.t()
            if a_cat is not None:
                a_cat[:, i * r:(i + 1) * r] = A[i]
        self._present = None

    def _grow(self) -> None:
        """Resize the (slots, in, r_max) / (slots, r_max, out) stacks to the slots, rank and modules now needed:
        the resident adapters' weights are copied over as one block per stack (smaller ranks zero-padded:
        exact) and the caller writes the slot that changed. Rewriting every slot on each new one took ~0.5 s
        with 8 resident, on the engine thread, while every request waited."""
        old, self._present = self.stacks, None
        self.stacks = {}
        keys = sorted({k for a in self.loaded for k in a.weights} | set(old) if self.loaded else set())
        r_max = max((a.rank for a in self.loaded), default=0)
        n = len(self.adapters)
        self.width = n * r_max
        for key in keys:
            if key in old:
                n_in, n_out = old[key][0].shape[1], old[key][1].shape[2]
            else:
                wa, wb = next(a.weights[key] for a in self.loaded if key in a.weights)
                n_in, n_out = wa.shape[1], wb.shape[0]
            A = torch.zeros(n, n_in, r_max, dtype=self.dtype, device=self.device)
            B = torch.zeros(n, r_max, n_out, dtype=self.dtype, device=self.device)
            scale = torch.zeros(n, dtype=self.dtype, device=self.device)
            if key in old:
                oA, oB, oscale = old[key][:3]
                m, r = min(oA.shape[0], n), oA.shape[2]
                A[:m, :, :r], B[:m, :r], scale[:m] = oA[:m], oB[:m], oscale[:m]
            # (in, slots*r), slot i's A at columns i*r: a copy, kept only while the masked path can run
            a_cat = A.permute(1, 0, 2).reshape(n_in, self.width).clone() if self.width <= MASKED_WIDTH else None
            self.stacks[key] = (A, B, scale, a_cat, B.view(-1, n_out))  # B's view follows writes into B
