"""The SFT recipe, top to bottom: set up, loop, validate, save. LoRA, DoRA, QLoRA, prompt tuning, full.

Runs on one process or under `accelerate launch` (DDP/FSDP/DeepSpeed). `train.fast_paths` decides whether
tunelab's CPU fast paths (tunelab.fast) are swapped in; off, the loop is plain transformers + PEFT.
Per-method rules (load dtype, wrapping, packing, optimizer groups) come from `tunelab.models.methods.METHODS`.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from tunelab import fast
from tunelab.config.recipe import Recipe
from tunelab.errors import TunelabError
from tunelab.models.build import build_model
from tunelab.models.methods import method_spec, trainable_parameters
from tunelab.runs import register_training_run
from tunelab.runs.layout import LOSS_PNG
from tunelab.train.checkpoint import (
    checkpoint_path,
    distributed_kind,
    held_parameters,
    load_trainable,
    sharded,
)
from tunelab.train.loop import train_loop, validate, validation_loss
from tunelab.train.monitor import Monitor, plot_losses
from tunelab.train.prepare import (
    TrainingRun,
    compile_layers,
    count_steps,
    make_optimizer,
    open_log,
    plan_data,
    recipe_hash,
    start_process,
)
from tunelab.train.runinfo import peak_rss_bytes, write_run_json

__all__ = ["compile_layers", "prepare_run", "recipe_hash", "train"]
log = logging.getLogger(__name__)


def train(recipe: Recipe, resume: bool = False, force: bool = False, show_progress: bool = True,
          stop_after_steps: int | None = None) -> Path:
    """Train per `recipe`; returns the output folder (PEFT adapter or HF model, recipe, run.json).

    resume: continue from the latest checkpoint in output_dir. force: train even when the memory
    estimate exceeds this device's memory. stop_after_steps: return early (tests, benchmarks).
    """
    if recipe.data.rag is not None and recipe.data.train is None:
        raise TunelabError(f"data.rag={recipe.data.rag}: the retrieved passages are written into training rows "
                           "first; run `tunelab train` (or tunelab.rag.raft.train_with_retrieval).")
    run = prepare_run(recipe, resume, force)
    if run.position.step == 0 and run.splits.validation:
        validate(run)  # the "before" point of the validation curve
    if not train_loop(run, show_progress, stop_after_steps):
        return run.out
    save(run)
    return run.out


def prepare_run(recipe: Recipe, resume: bool = False, force: bool = False) -> TrainingRun:
    """Everything before the first step: process, model + fast paths, data, optimizer, resume state."""
    t0 = time.time()
    fast_on = fast.begin(recipe.train.fast_paths)  # first: process settings precede torch's first allocation
    accelerator = start_process(recipe, resume, force)
    random.seed(recipe.train.seed)
    torch.manual_seed(recipe.train.seed)
    spec = method_spec(recipe.method)
    model, tok, compute = build_model(recipe, str(accelerator.device))
    trainable, total_params = trainable_parameters(model)
    t = recipe.train
    packing = t.packing and spec.supports_packing
    if fast_on and sharded(accelerator):  # both swap module classes: FSDP2's fully_shard fails on the fast ones
        fast_on = False
        if accelerator.is_main_process:
            log.warning("fast paths off: they do not run on sharded (FSDP / DeepSpeed) models")
    paths = fast.enable(model, on=fast_on, packing=packing, max_length=t.max_length)
    if t.compile:
        compile_layers(model)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    flat = paths.flat_batches(packing)
    share = t.share_prefix if flat and not t.compile else 0  # compiled steps need static shapes
    splits, sequences, val_batches = plan_data(recipe, tok, packing, flat, share, rank, world, main,
                                               even=sharded(accelerator))
    recipe, small_data = recipe.fit_to_data(len(sequences), world)  # small data: a batch that fits it
    t = recipe.train
    if small_data and main:
        log.warning(small_data)
    total_steps = count_steps(recipe, len(sequences), world)
    optimizer, scheduler, params = make_optimizer(recipe, spec, model, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    if sharded(accelerator):  # FSDP2 swapped the parameters for their shards (DTensors)
        params = [p for p in model.parameters() if p.requires_grad]
    run = TrainingRun(recipe=recipe, spec=spec, out=Path(recipe.output_dir), accelerator=accelerator, model=model,
              tok=tok, compute=compute, fast=paths, splits=splits, sequences=sequences, val_batches=val_batches,
              total_steps=total_steps, optimizer=optimizer, scheduler=scheduler, params=params,
              trainable=trainable, total_params=total_params, t0=t0)
    run.monitor = Monitor(run.log_path, recipe.validation.patience)
    open_log(run, resume)
    if main:
        for note in paths.notes:
            log.warning(note)
        log.info(f"{recipe.method}: {trainable:,} trainable of {total_params:,} params; "
                 f"{len(splits.train)} train examples -> {len(sequences)} sequences; {total_steps} steps of "
                 f"{t.batch_size}x{run.accum}x{world}; compute {compute}; fast paths {'on' if fast_on else 'off'}")
    return run


def save(run: TrainingRun) -> None:
    """Final validation (unless the last step just ran one), the best step's weights when early stopping is on,
    the adapter or model, the loss plot, run.json."""
    from accelerate.utils import gather_object

    restored = restore_best(run)
    if restored is not None:
        final_val = restored[1]
    else:
        final_val = run.position.last_val[1] if run.position.last_val[0] == run.position.step else \
            validation_loss(run) if run.splits.validation else None
    run.accelerator.wait_for_everyone()
    model = run.accelerator.unwrap_model(run.model)
    state = _untied(run.accelerator.get_state_dict(run.model), model) if sharded(run.accelerator) else None  # all
    held = gather_object([held_parameters(run.model)]) if run.world > 1 else [held_parameters(run.model)]
    if run.main:
        m = run.monitor
        if restored is None and final_val is not None and (not m.val_hist or m.val_hist[-1][0] != run.position.step):
            m.validation(run.position.step, final_val)
        _save_final(model, run.tok, run.out, state)
        if run.log_path.exists():
            plot_losses(run.log_path, run.out / LOSS_PNG)
        write_run_json(run.out, run.recipe, run.splits.sources, {
            "steps": run.position.step, "final_val_loss": final_val,
            "best_val_loss": m.best_val if math.isfinite(m.best_val) else None,
            "best_val_step": run.position.best_step, "restored_best_step": restored[0] if restored else None,
            "trainable_params": run.trainable, "total_params": run.total_params, "tokens": run.position.tokens_seen,
            "stopped_early": run.position.stopped_early, "data_stats": {k: asdict(v) for k, v in run.splits.stats.items()},
            "processes": run.world, "fast_paths": run.fast.on, "params_held": held,  # per process
            "distributed": distributed_kind(run.accelerator),
        }, wall_s=time.time() - run.t0, peak_rss=peak_rss_bytes())
        register_training_run(run.out)  # registry row + lineage (and MLflow when report_to says so); never raises
    run.accelerator.wait_for_everyone()


def restore_best(run: TrainingRun) -> tuple[int, float] | None:
    """With early stopping on (validation.patience), put back the weights of the best validation step when a
    later step was worse; -> (that step, its validation loss), or None when the last weights are kept."""
    best, v = run.position.best_step, run.recipe.validation
    if v.patience is None or not v.every or best is None or best >= run.position.step:
        return None
    if best == 0:
        if run.main:
            log.warning("validation never improved on the starting weights; keeping the last ones")
        return None
    ckpt = checkpoint_path(run.out, best)
    if not (ckpt / "state.json").is_file():
        if run.main:
            log.warning(f"the best validation step {best} has no checkpoint ({ckpt.name}); keeping the last "
                        "weights")
        return None
    run.accelerator.wait_for_everyone()
    if (ckpt / "accelerate").is_dir():  # sharded: every rank reads its share
        run.accelerator.load_state(str(ckpt / "accelerate"))
    else:
        load_trainable(ckpt, run.accelerator.unwrap_model(run.model))
    val = dict(run.monitor.val_hist).get(best) if run.main else None
    if run.main:
        log.info(f"restored the weights of step {best} (best validation loss {val:.4f}) from {ckpt.name}; "
                 f"the last step, {run.position.step}, validated worse")
    return best, val


def _untied(state: dict, model) -> dict:
    """The gathered full state without the second name of a tied weight (lm_head = embed_tokens): gathered, the
    two are separate tensors, which save_pretrained would then write twice. Keeps the name named_parameters() does."""
    aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    return {k: v for k, v in state.items() if k not in aliases}


def _save_final(model, tok, out: Path, state_dict: dict | None = None) -> None:
    """Write the adapter (or full model) and tokenizer atomically into `out`; `state_dict`: the full state
    gathered from the shards (FSDP / DeepSpeed)."""
    tmp = out / ".final-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
    tok.save_pretrained(tmp)
    for f in tmp.iterdir():
        f.replace(out / f.name)
    tmp.rmdir()
