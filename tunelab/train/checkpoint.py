"""Atomic checkpoints: trainable weights, optimizer, scheduler, RNG and data position; resume from the latest."""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tunelab.errors import TunelabError

CKPT_GLOB = "checkpoint-*"


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(out_dir: Path, step: int, model, optimizer, scheduler, position: dict, recipe_hash: str,
                    keep_last: int) -> Path:
    """Write checkpoint-<step> via a temp folder + rename, then prune to the last `keep_last`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"checkpoint-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=".ckpt-", dir=out_dir))
    try:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   tmp / "optimizer.pt")
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()[1]}
        torch.save({k: torch.as_tensor(v) for k, v in rng.items()}, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "position": position,
                                                    "recipe_hash": recipe_hash}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(out_dir.glob(CKPT_GLOB))[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    done = [p for p in sorted(out_dir.glob(CKPT_GLOB)) if (p / "state.json").is_file()]
    return done[-1] if done else None


def load_checkpoint(ckpt: Path, model, optimizer, scheduler, recipe_hash: str) -> dict:
    """Restore everything saved by `save_checkpoint`; returns its state (step, position)."""
    state = json.loads((ckpt / "state.json").read_text())
    if state["recipe_hash"] != recipe_hash:
        raise TunelabError(
            f"{ckpt} was written by a different recipe (hash {state['recipe_hash']} != {recipe_hash}); "
            "resume with the recipe saved in that run folder (recipe.yaml) or choose a new output_dir."
        )
    weights = load_file(str(ckpt / "trainable.safetensors"))
    params = dict(model.named_parameters())
    for name, value in weights.items():
        params[name].data.copy_(value)
    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    rng = torch.load(ckpt / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate((3, tuple(int(x) for x in rng["python"].tolist()), None))
    return state
