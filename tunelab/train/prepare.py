"""Preparing a training run: the model for the recipe's method, the fast paths, data and batches, optimizer, resume.

Every function here is one step of `tunelab.train.sft.train`'s preparation; `TrainingRun` is what they build
together, and its `position` is what the loop advances.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tunelab.config.recipe import Recipe, save_recipe
from tunelab.data import Batches
from tunelab.errors import TunelabError
from tunelab.models.methods import MethodSpec
from tunelab.models.optim import build_optimizer, build_scheduler
from tunelab.plan import preflight
from tunelab.runs.layout import RECIPE_YAML, open_train_log
from tunelab.train.checkpoint import distributed_kind, latest_checkpoint, load_checkpoint
from tunelab.train.dataset import Splits, prepare_splits
from tunelab.train.monitor import Monitor

if TYPE_CHECKING:
    from tunelab.fast import FastPaths

log = logging.getLogger(__name__)


@dataclass
class LoopPosition:
    """Where the training loop is: what a checkpoint saves and a resume restores, and how validation went."""

    step: int = 0
    epoch: int = 0
    index: int = 0  # the next micro-batch of the epoch
    tokens_seen: int = 0
    computed_seen: int = 0  # token positions the model ran: fewer than tokens_seen when prefixes are shared
    stopped_early: bool = False
    last_val: tuple[int, float | None] = (-1, None)  # (step, loss) of the latest validation
    best_step: int | None = None  # the step of the best validation loss so far (on every process)


@dataclass
class TrainingRun:
    """What set-up built for one training run (model, data, optimizer, ...) and the loop's `position`."""

    recipe: Recipe
    spec: MethodSpec
    out: Path
    accelerator: object
    model: torch.nn.Module
    tok: object
    compute: torch.dtype
    fast: FastPaths  # what tunelab.fast.enable returned (the trainer's one use of the fast paths)
    splits: Splits
    sequences: list[list[int]]  # packed rows (lists of example indices), planned once, shuffled per epoch
    val_batches: list[dict]  # this rank's share (may be empty on some ranks)
    total_steps: int
    optimizer: torch.optim.Optimizer
    scheduler: object
    params: list[torch.nn.Parameter]
    monitor: Monitor | None = None  # set once the run folder's log path is known
    trainable: int = 0
    total_params: int = 0
    t0: float = field(default_factory=time.time)
    position: LoopPosition = field(default_factory=LoopPosition)

    @property
    def device(self) -> str:
        return str(self.accelerator.device)

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def packing(self) -> bool:
        return self.recipe.train.packing and self.spec.supports_packing

    @property
    def flat(self) -> bool:
        """Padding-free (1, N) micro-batches: packing through the fast paths' per-example attention."""
        return self.fast.flat_batches(self.packing)

    @property
    def share_prefix(self) -> int:
        t = self.recipe.train
        return t.share_prefix if self.flat and not t.compile else 0  # compiled steps need static shapes

    @property
    def n_virtual(self) -> int:
        return self.recipe.prompt.num_virtual_tokens if self.spec.prompt else 0

    @property
    def accum(self) -> int:
        return self.recipe.accumulation(self.world)

    @property
    def log_path(self) -> Path:
        return open_train_log(self.out)

    def autocast(self):
        if self.compute == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.split(":")[0], dtype=self.compute)


def recipe_hash(recipe: Recipe) -> str:
    """Hash of the fields that change what is trained (not where it is written, how often saved or validated,
    nor whether the fast paths compute it). Spelled as before the `validation:` rename, so old runs resume."""
    d = recipe.model_dump(mode="json")
    for k in ("output_dir", "checkpoint_every", "keep_last", "report_to", "mlflow_tracking_uri", "lint"):
        d.pop(k, None)
    for section, key in (("model", "chat_template"), ("model", "rope_scaling"), ("data", "mix")):
        if d[section].get(key) is None:  # keys added later: absent when unset, so older runs still resume
            d[section].pop(key, None)
    d["train"].pop("fast_paths", None)
    d["eval"] = d.pop("validation")
    d["eval"].pop("every", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def start_process(recipe: Recipe, resume: bool, force: bool):
    """Refuse to overwrite checkpoints, set threads, lint the recipe; -> the Accelerator."""
    from accelerate import Accelerator

    out = Path(recipe.output_dir)
    if out.exists() and any(out.glob("checkpoint-*")) and not resume:
        raise TunelabError(f"{out} already holds checkpoints: pass --resume to continue, or choose another "
                           "output_dir (output_dir=runs/NAME).")
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    shard_cpu_processes(accelerator.state, os.environ)
    notice = unsharded_notice(accelerator.state, os.environ)
    if notice and accelerator.is_main_process:
        log.warning(notice)
    _preflight(recipe, force, accelerator.is_main_process, accelerator.num_processes, zero_stage(accelerator.state))
    return accelerator


def shard_cpu_processes(state, environ) -> bool:
    """TrainingRun FSDP2 on CPU processes (gloo) when the launch asks for it (`accelerate launch --use_fsdp
    --fsdp_version 2`); -> whether it did.

    Accelerate 1.x switches to DistributedType.FSDP only for GPU-like devices and otherwise runs the launch as
    MULTI_CPU (plain DDP). Torch's FSDP2 itself runs on CPUs: `fully_shard` on a "cpu" device mesh over gloo, and
    torch.distributed.checkpoint saves and loads the shards. So for CPU processes this does the three
    assignments AcceleratorState does for GPUs (accelerate/state.py, the FSDP branch of its __init__), with the
    plugin Accelerate builds from the launch's FSDP_* variables; everything past that gate (`fully_shard` in
    `prepare`, `save_state` / `load_state` through torch.distributed.checkpoint, the gathered state dict) is
    Accelerate's own FSDP2 code. FSDP1 stays Accelerate's DDP: torch's FSDP1 refuses CPUs ("FSDP needs a
    non-CPU accelerator device", torch/distributed/fsdp/_init_utils.py, torch 2.13).
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if (state.distributed_type != DistributedType.MULTI_CPU
            or environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true"):
        return False
    plugin = FullyShardedDataParallelPlugin()  # reads FSDP_VERSION, FSDP_RESHARD_AFTER_FORWARD, ...
    if plugin.fsdp_version != 2:
        return False
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True


def unsharded_notice(state, environ) -> str | None:
    """A warning when the launch asked for FSDP or DeepSpeed but Accelerate runs something else: on CPU
    processes (gloo) Accelerate 1.x sets FSDP only for GPU-like devices and silently runs DDP, every process
    holding the whole model and optimizer. `shard_cpu_processes` runs FSDP2 there; FSDP1 torch itself refuses
    on CPUs ("FSDP needs a non-CPU accelerator device", torch 2.13), and DeepSpeed is not tried."""
    kind = distributed_kind(state)
    for name, asked, fix in (("FSDP", "ACCELERATE_USE_FSDP", "; launch with --fsdp_version 2 to shard CPU processes"),
                             ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED", "")):
        if environ.get(asked, "false").lower() == "true" and kind not in ("FSDP", "DEEPSPEED"):
            return (f"the launch asked for {name} but Accelerate runs it as {kind} (it shards only on GPUs and "
                    f"other accelerators): every process holds the whole model and optimizer{fix}")
    return None


def zero_stage(state) -> int:
    """The ZeRO stage equivalent to an Accelerate state's sharding: DeepSpeed's own stage; FSDP full sharding
    (FSDP1 FULL_SHARD / HYBRID_SHARD, FSDP2 reshard_after_forward) 3, gradients and optimizer only
    (SHARD_GRAD_OP) 2, NO_SHARD 0; DDP and one process 0."""
    kind = distributed_kind(state)
    if kind == "DEEPSPEED":
        return int(state.deepspeed_plugin.zero_stage or 0)
    if kind != "FSDP":
        return 0
    plugin = state.fsdp_plugin
    if getattr(plugin, "fsdp_version", 1) == 2:
        return 3 if plugin.reshard_after_forward else 2
    strategy = getattr(plugin.sharding_strategy, "name", str(plugin.sharding_strategy)).upper()
    return {"FULL_SHARD": 3, "HYBRID_SHARD": 3, "SHARD_GRAD_OP": 2, "_HYBRID_SHARD_ZERO2": 2}.get(strategy, 0)


def _preflight(recipe: Recipe, force: bool, verbose: bool, processes: int = 1, zero: int = 0) -> None:
    """Lint the recipe and check the memory estimate against this device before any training: per process,
    with what the launch configuration shards (`zero_stage`) divided among the processes."""
    findings = preflight(recipe, processes=processes, zero=zero)
    errors = [f for f in findings if f.level == "error"]
    if verbose:
        for f in findings:
            if f.level == "allowed":  # one line: the recipe has accepted it, with its reason
                log.info(f"allowed: [{f.code}] {f.message}", extra={"style": "dim"})
            elif f.level == "warning" or force:
                log.warning(str(f))
    if errors and not force:
        raise TunelabError("the recipe fails its preflight checks (pass --force to train anyway):\n"
                           + "\n".join(str(f) for f in errors))


def compile_layers(model) -> int:
    """Regional compilation: torch.compile every decoder layer (one graph, reused by all of them).

    Inductor fuses the elementwise work around the matmuls (RMSNorm, rotary, SiLU, LoRA scale/add)
    that dominates a small model's step on a CPU. Batches are padded to max_length so shapes are static.
    """
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    for layer in layers:
        layer.compile(dynamic=False)
    return len(layers)


def plan_data(recipe: Recipe, tok, packing: bool, flat: bool, share: int, rank: int, world: int, main: bool,
              even: bool = False):
    """Tokenised splits, the training rows (planned once) and this rank's validation batches; `even` (sharded
    models, whose every forward is collective): as many on every rank, the extra ones weighing 0."""
    t = recipe.train
    splits = prepare_splits(recipe.data, tok, t.prompt_loss_weight, t.max_length, t.seed)
    for name, st in splits.stats.items():
        if main:
            warn = st.truncated or st.dropped_too_long or st.dropped_no_response
            log.log(logging.WARNING if warn else logging.INFO,
                    f"{name}: {st.summary()} (data.too_long={recipe.data.too_long})")
    sequences = [plan[0] for plan in Batches(splits.train, 1, t.max_length, tok.pad_token_id, packing,
                                             seed=t.seed).plan]
    every = list(Batches(splits.validation, t.batch_size, t.max_length, tok.pad_token_id, packing, seed=0,
                         flat=flat, share_prefix=share))
    val_batches = every[rank::world]
    if even and every:
        blank = {**every[0], "weights": torch.zeros_like(every[0]["weights"])}
        val_batches += [blank] * (-(-len(every) // world) - len(val_batches))
    return splits, sequences, val_batches


def count_steps(recipe: Recipe, n_sequences: int, world: int) -> int:
    """Optimizer steps of the run: train.max_steps, or epochs x the steps one epoch of sequences makes (the
    batch is fitted to small data first: `Recipe.fit_to_data`)."""
    b, accum = recipe.train.batch_size, recipe.accumulation(world)
    per_epoch = n_sequences // (b * world * accum)
    if per_epoch == 0:
        raise TunelabError(f"only {n_sequences} training sequences: fewer than one optimizer step of "
                           f"batch_size x grad_accum x processes = {b * accum * world}; lower train.batch_size "
                           "or train.effective_batch, or add data.")
    return recipe.train.max_steps or max(1, math.ceil(per_epoch * recipe.train.epochs))


def make_optimizer(recipe: Recipe, spec: MethodSpec, model, total_steps: int):
    """(optimizer, scheduler, trainable parameters): LoRA+ ratios apply to LoRA adapters only."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    plus = recipe.lora.plus_ratio if spec.lora else None
    optimizer = build_optimizer(named, recipe.train, plus)
    return optimizer, build_scheduler(optimizer, recipe.train, total_steps), [p for _, p in named]


def open_log(run: TrainingRun, resume: bool) -> None:
    """Resume from the latest checkpoint (optimizer, schedule, position, log), or start the run folder."""
    run.out.mkdir(parents=True, exist_ok=True)
    rhash = recipe_hash(run.recipe)
    if resume and (ckpt := latest_checkpoint(run.out)):
        state = load_checkpoint(ckpt, run.accelerator, run.model, run.optimizer, run.scheduler, rhash)
        pos = state["position"]
        run.position.step, run.position.epoch, run.position.index = state["step"], pos["epoch"], pos["index"]
        run.position.tokens_seen, run.position.computed_seen = pos.get("tokens", 0), pos.get("computed_tokens", 0)  # older: absent
        if run.main:  # one writer: a rank reading while another rewrites it could read it half-written
            _truncate_log(run.log_path, run.position.step)
            log.info(f"resumed from {ckpt.name} at step {run.position.step}")
        run.accelerator.wait_for_everyone()  # every rank replays the truncated log below
    elif run.main:
        run.log_path.unlink(missing_ok=True)
        save_recipe(run.recipe, run.out / RECIPE_YAML)
    if run.position.step:
        run.monitor.replay()
        run.position.best_step = run.monitor.best_step


def _truncate_log(path: Path, step: int) -> None:
    """Drop log rows written after the checkpoint we resume from (they will be logged again)."""
    if not path.exists():
        return
    rows = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    path.write_text("".join(r + "\n" for r in rows))
