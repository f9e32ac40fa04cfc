"""DDP through `accelerate launch --num_processes 2 --cpu` (gloo) matches one process with twice the batch."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tunelab.config.recipe import load_recipe
from tunelab.train import train


def _losses(folder):
    rows = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["val_loss"] for r in rows if "val_loss" in r]


@pytest.mark.skipif(shutil.which("accelerate") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "accelerate")), reason="accelerate CLI not installed")
def test_two_process_ddp_matches_one_process_with_double_batch(tiny_model_dir, chat_file, tmp_path):
    common = [f"model.spec={tiny_model_dir}", "data.task=null", f"data.train={chat_file}",
              "train.max_steps=5", "train.grad_accum=1", "train.effective_batch=null", "train.max_length=128",
              "train.precision=fp32", "lora.dropout=0", "train.lr=1e-3", "validation.every=5",
              "checkpoint_every=null", "train.packing=true"]
    single = train(load_recipe(None, [*common, "train.batch_size=4", f"output_dir={tmp_path / 'one'}"]),
                   show_progress=False)
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")  # --multi_gpu: torchrun; gloo on CPU
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "tunelab.cli", "train", *common,
           "train.batch_size=2", f"output_dir={tmp_path / 'two'}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["metrics"]["processes"] == 2
    (a, va), (b, vb) = _losses(single), _losses(tmp_path / "two")
    assert len(a) == len(b) == 5
    for x, y in zip(a, b):
        assert abs(x - y) < 2e-3 * max(1.0, abs(x)), f"losses differ: {a} vs {b}"
    for x, y in zip(va, vb):
        assert abs(x - y) < 2e-3 * max(1.0, abs(x)), f"validation losses differ: {va} vs {vb}"
