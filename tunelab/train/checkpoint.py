"""Atomic checkpoints: trainable weights, optimizer, scheduler, every rank's RNG and the data position.

One process, DDP: rank 0 writes the trainable weights and the optimizer (they are the same on every rank).
FSDP / DeepSpeed: the weights and optimizer states are sharded, so every rank writes its share through
Accelerate's `save_state` (and reads it back with `load_state`). Either way each rank's RNG state (CPU,
CUDA when present, Python) is gathered into `rng.pt`, and each rank resumes from its own.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tunelab.errors import TunelabError

CKPT_GLOB = "checkpoint-*"
SHARDED = ("FSDP", "DEEPSPEED")  # accelerate DistributedType names whose states are split across ranks
log = logging.getLogger(__name__)


def checkpoint_path(out_dir: Path, step: int) -> Path:
    return out_dir / f"checkpoint-{step:07d}"


def sharded(accelerator) -> bool:
    """Whether the model and optimizer states are split across processes (FSDP or DeepSpeed)."""
    return distributed_kind(accelerator) in SHARDED


def distributed_kind(state) -> str:
    """Accelerate's DistributedType name of an Accelerator or AcceleratorState ("NO", "MULTI_CPU", "FSDP", ...)."""
    return str(getattr(state.distributed_type, "value", state.distributed_type))


def held_parameters(model) -> int:
    """Parameter elements this process holds: its own shards under FSDP2 (DTensor.to_local), every one otherwise."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict:
    """This process's random state: torch CPU, every CUDA device (when present) and Python's."""
    state = {"torch": torch.get_rng_state(), "python": torch.tensor(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(int(x) for x in state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(accelerator, out_dir: Path, step: int, model, optimizer, scheduler, position: dict,
                    recipe_hash: str, keep_last: int, protect: tuple[int, ...] = ()) -> Path:
    """Write checkpoint-<step> via a temp folder + rename (every process calls this), then prune to the last
    `keep_last`, never removing the checkpoints of the steps in `protect` (the best validation step)."""
    from accelerate.utils import gather_object

    main = accelerator.is_main_process
    final, tmp = checkpoint_path(out_dir, step), out_dir / f".tmp-checkpoint-{step:07d}"
    rngs = gather_object([rng_state()]) if accelerator.num_processes > 1 else [rng_state()]
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if sharded(accelerator):
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp / "accelerate"))  # each rank its shard of weights and optimizer
        accelerator.wait_for_everyone()
    if main:
        try:
            if not sharded(accelerator):
                save_file(trainable_state(accelerator.unwrap_model(model)), str(tmp / "trainable.safetensors"))
                torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                           tmp / "optimizer.pt")
            else:
                torch.save({"scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
            torch.save({"ranks": rngs}, tmp / "rng.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, "position": position,
                                                        "recipe_hash": recipe_hash,
                                                        "processes": accelerator.num_processes}, indent=2))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        keep = {checkpoint_path(out_dir, s).name for s in protect}
        for old in sorted(out_dir.glob(CKPT_GLOB))[:-keep_last]:
            if old.name not in keep:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    done = [p for p in sorted(out_dir.glob(CKPT_GLOB)) if (p / "state.json").is_file()]
    return done[-1] if done else None


def load_trainable(ckpt: Path, model) -> None:
    """Copy a checkpoint's trainable weights into `model` (an unwrapped model)."""
    weights = load_file(str(ckpt / "trainable.safetensors"))
    params = dict(model.named_parameters())
    for name, value in weights.items():
        params[name].data.copy_(value)


def load_checkpoint(ckpt: Path, accelerator, model, optimizer, scheduler, recipe_hash: str) -> dict:
    """Restore everything saved by `save_checkpoint`, this rank's own RNG state included; -> its state
    (step, position)."""
    state = json.loads((ckpt / "state.json").read_text())
    if state["recipe_hash"] != recipe_hash:
        raise TunelabError(
            f"{ckpt} was written by a different recipe (hash {state['recipe_hash']} != {recipe_hash}); "
            "resume with the recipe saved in that run folder (recipe.yaml) or choose a new output_dir."
        )
    if (ckpt / "accelerate").is_dir():
        accelerator.load_state(str(ckpt / "accelerate"))
        scheduler.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True)["scheduler"])
    else:
        if sharded(accelerator):
            raise TunelabError(f"{ckpt} holds unsharded weights but this run shards them (FSDP / DeepSpeed); "
                               "resume it with the launch configuration that wrote it.")
        load_trainable(ckpt, accelerator.unwrap_model(model))
        opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
        optimizer.load_state_dict(opt["optimizer"])
        scheduler.load_state_dict(opt["scheduler"])
    rng = torch.load(ckpt / "rng.pt", weights_only=True)
    ranks = rng.get("ranks", [rng])  # checkpoints before per-rank states hold one
    if len(ranks) != accelerator.num_processes and accelerator.is_main_process:
        log.warning(f"{ckpt.name} was written by {len(ranks)} process(es), this run has "
                    f"{accelerator.num_processes}: dropout and shuffling will not repeat the interrupted run")
    set_rng_state(ranks[min(accelerator.process_index, len(ranks) - 1)])
    return state
