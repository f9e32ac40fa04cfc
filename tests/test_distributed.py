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


ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")
needs_accelerate = pytest.mark.skipif(shutil.which("accelerate") is None and not os.path.exists(ACCELERATE),
                                      reason="accelerate CLI not installed")


def _launch_two(*args: str) -> None:
    """`tunelab train ARGS` on 2 CPU processes (accelerate launch --multi_gpu: torchrun; gloo on a CPU)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "tunelab.cli", "train", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@needs_accelerate
def test_two_process_ddp_matches_one_process_with_double_batch(tiny_model_dir, chat_file, tmp_path):
    common = [f"model.spec={tiny_model_dir}", "data.task=null", f"data.train={chat_file}",
              "train.max_steps=5", "train.grad_accum=1", "train.effective_batch=null", "train.max_length=128",
              "train.precision=fp32", "lora.dropout=0", "train.lr=1e-3", "validation.every=5",
              "checkpoint_every=null", "train.packing=true"]
    single = train(load_recipe(None, [*common, "train.batch_size=4", f"output_dir={tmp_path / 'one'}"]),
                   show_progress=False)
    _launch_two(*common, "train.batch_size=2", f"output_dir={tmp_path / 'two'}")
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["metrics"]["processes"] == 2
    (a, va), (b, vb) = _losses(single), _losses(tmp_path / "two")
    assert len(a) == len(b) == 5
    for x, y in zip(a, b):
        assert abs(x - y) < 2e-3 * max(1.0, abs(x)), f"losses differ: {a} vs {b}"
    for x, y in zip(va, vb):
        assert abs(x - y) < 2e-3 * max(1.0, abs(x)), f"validation losses differ: {va} vs {vb}"


@needs_accelerate
def test_two_process_resume_restores_each_ranks_own_random_state(tiny_model_dir, chat_file, tmp_path):
    """PEFT's dropout draws one random number per element, so ranks whose padded rows differ in length leave
    step 2 with different RNG states: resumed from a step-2 checkpoint, each rank continues from its own and
    steps 3-4 repeat the uninterrupted run. (The fast paths' dropout draws one seed per mask, so its ranks
    stay alike: they are off here.)"""
    import torch

    common = [f"model.spec={tiny_model_dir}", "data.task=null", f"data.train={chat_file}", "train.max_steps=4",
              "train.grad_accum=1", "train.effective_batch=null", "train.batch_size=2", "train.max_length=128",
              "train.precision=fp32", "lora.dropout=0.1", "train.lr=1e-3", "validation.every=null",
              "checkpoint_every=2", "keep_last=5", "train.packing=true", "train.fast_paths=off"]
    full, part = tmp_path / "full", tmp_path / "part"
    _launch_two(*common, f"output_dir={full}")
    ckpt = full / "checkpoint-0000002"
    ranks = torch.load(ckpt / "rng.pt", weights_only=True)["ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"]), "ranks drew alike"
    part.mkdir()
    shutil.copytree(ckpt, part / ckpt.name)  # as if killed after step 2
    for name in ("train_log.jsonl", "recipe.yaml"):
        shutil.copy(full / name, part / name)
    _launch_two(*common, f"output_dir={part}", "--resume")
    (a, _), (b, _) = _losses(full), _losses(part)
    assert len(a) == len(b) == 4
    for step, (x, y) in enumerate(zip(a, b), 1):
        assert abs(x - y) < 1e-4, f"step {step}: {a} vs {b}"
    from safetensors.torch import load_file

    # the losses barely feel a dropout mask on the small early adapters; its gradients do
    wa, wb = (load_file(str(f / "adapter_model.safetensors")) for f in (full, part))
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.allclose(wa[name], wb[name], rtol=0, atol=1e-6), name


@pytest.mark.parametrize("kind,plugin,stage", [
    ("NO", {}, 0), ("MULTI_CPU", {}, 0), ("MULTI_GPU", {}, 0),
    ("DEEPSPEED", {"deepspeed_plugin": {"zero_stage": 2}}, 2), ("DEEPSPEED", {"deepspeed_plugin": {"zero_stage": 3}}, 3),
    ("FSDP", {"fsdp_plugin": {"fsdp_version": 1, "sharding_strategy": "FULL_SHARD"}}, 3),
    ("FSDP", {"fsdp_plugin": {"fsdp_version": 1, "sharding_strategy": "SHARD_GRAD_OP"}}, 2),
    ("FSDP", {"fsdp_plugin": {"fsdp_version": 1, "sharding_strategy": "NO_SHARD"}}, 0),
    ("FSDP", {"fsdp_plugin": {"fsdp_version": 2, "reshard_after_forward": True}}, 3),
    ("FSDP", {"fsdp_plugin": {"fsdp_version": 2, "reshard_after_forward": False}}, 2),
])
def test_the_preflight_reads_the_sharding_stage_of_the_launch(kind, plugin, stage):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import ShardingStrategy

    from tunelab.train.setup import zero_stage

    fields = {k: SimpleNamespace(**v) for k, v in plugin.items()}
    if "sharding_strategy" in plugin.get("fsdp_plugin", {}):  # accelerate keeps torch's enum
        fields["fsdp_plugin"].sharding_strategy = ShardingStrategy[plugin["fsdp_plugin"]["sharding_strategy"]]
    assert zero_stage(SimpleNamespace(distributed_type=DistributedType[kind], **fields)) == stage


def test_a_launch_asking_for_fsdp_that_accelerate_runs_as_ddp_is_named():
    """Measured with accelerate 1.15: `accelerate launch --use_fsdp --num_processes 2` on CPUs gives
    DistributedType.MULTI_CPU (plain DDP over gloo); FSDP is set only for GPU-like devices."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from tunelab.train.setup import unsharded_notice

    cpu = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU)
    assert "asked for FSDP but Accelerate runs it as MULTI_CPU" in unsharded_notice(cpu, {"ACCELERATE_USE_FSDP": "true"})
    assert "DeepSpeed" in unsharded_notice(cpu, {"ACCELERATE_USE_DEEPSPEED": "true"})
    assert unsharded_notice(cpu, {}) is None
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP)
    assert unsharded_notice(fsdp, {"ACCELERATE_USE_FSDP": "true"}) is None
