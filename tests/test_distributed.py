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


def _launch_two(*args: str, launch: tuple[str, ...] = ("--multi_gpu",)) -> None:
    """`tunelab train ARGS` on 2 CPU processes (accelerate launch --multi_gpu: torchrun; gloo on a CPU)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [ACCELERATE, "launch", *launch, "--num_processes", "2", "--num_machines", "1",
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


def _halves(folder) -> int:
    """Check that every tensor (of > 1 row) of a torch.distributed.checkpoint folder was written as two halves,
    one by each process (files __0_0.distcp, __1_0.distcp); -> how many tensors it checked."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = FileSystemReader(str(folder)).read_metadata()
    files = {(i.fqn, tuple(i.offset or ())): info.relative_path for i, info in md.storage_data.items()}
    checked = 0
    for name, meta in md.state_dict_metadata.items():
        if not isinstance(meta, TensorStorageMetadata) or not meta.size or meta.size[0] < 2:
            continue  # scalars (the optimizer's step count) are not sharded
        assert [c.sizes[0] for c in meta.chunks] == [meta.size[0] // 2] * 2, (name, meta.chunks)
        assert sorted(files[(name, tuple(c.offsets))] for c in meta.chunks) == ["__0_0.distcp", "__1_0.distcp"]
        checked += 1
    return checked


@pytest.mark.slow  # ~100 s on 2 shared cores: three runs, two of them launched on 2 processes
@needs_accelerate
def test_fsdp2_on_two_cpu_processes_saves_resumes_and_matches_one_process(tiny_model_dir, chat_file, tmp_path):
    """A full finetune sharded by FSDP2 over gloo (setup.shard_cpu_processes lifts Accelerate's GPU-only gate):
    each process holds half the weights, each writes its half of the checkpoint through Accelerate's
    save_state, a run resumed from step 2 repeats the uninterrupted one, and both match one process with twice
    the batch. The 3 validation rows make one batch: the second process runs a weight-0 copy alongside."""
    import torch
    from safetensors.torch import load_file

    fsdp2 = ("--use_fsdp", "--fsdp_version", "2")
    common = ["method=full", f"model.spec={tiny_model_dir}", "data.task=null", f"data.train={chat_file}",
              "train.max_steps=4", "train.grad_accum=1", "train.effective_batch=null", "train.max_length=128",
              "train.precision=fp32", "train.lr=1e-3", "validation.every=2", "checkpoint_every=2", "keep_last=5",
              "train.packing=true", "train.fast_paths=off"]
    one, full, part = tmp_path / "one", tmp_path / "full", tmp_path / "part"
    train(load_recipe(None, [*common, "train.batch_size=4", f"output_dir={one}"]), show_progress=False)
    _launch_two(*common, "train.batch_size=2", f"output_dir={full}", launch=fsdp2)
    metrics = json.loads((full / "run.json").read_text())["metrics"]
    assert metrics["distributed"] == "FSDP" and metrics["processes"] == 2
    assert metrics["params_held"] == [metrics["total_params"] // 2] * 2  # DTensor shards: each holds half
    ckpt = full / "checkpoint-0000002"
    assert _halves(ckpt / "accelerate" / "pytorch_model_fsdp_0") == 21  # 20 weights, the tied head by both names
    assert _halves(ckpt / "accelerate" / "optimizer_0") == 40  # AdamW's two moments of each
    assert len(torch.load(ckpt / "rng.pt", weights_only=True)["ranks"]) == 2

    part.mkdir()
    shutil.copytree(ckpt, part / ckpt.name)  # as if killed after step 2
    for name in ("train_log.jsonl", "recipe.yaml"):
        shutil.copy(full / name, part / name)
    _launch_two(*common, "train.batch_size=2", f"output_dir={part}", "--resume", launch=fsdp2)
    (a, va), (b, vb), (c, vc) = _losses(one), _losses(full), _losses(part)
    assert len(a) == len(b) == len(c) == 4 and len(va) == len(vb) == len(vc) == 3  # steps 0, 2, 4
    assert b == c and max(abs(x - y) for x, y in zip(vb, vc)) < 1e-6, f"resumed: {b} {vb} vs {c} {vc}"
    for x, y in zip(a + va, b + vb):  # measured: equal to the 5 logged decimals, validation within 2e-6
        assert abs(x - y) < 1e-4, f"one process {a} {va} vs FSDP {b} {vb}"
    base, wa, wb, wc = (load_file(str(f / "model.safetensors")) for f in (tiny_model_dir, one, full, part))
    assert wa.keys() == wb.keys() == wc.keys() == base.keys()  # the tied head is not written twice
    for name in wa:
        assert (wb[name] - base[name]).abs().max() > 1e-4, f"{name} did not train"
        assert torch.equal(wb[name], wc[name]), f"{name}: resumed != uninterrupted"
        assert torch.allclose(wa[name], wb[name], rtol=0, atol=1e-5), f"{name}: FSDP != one process"  # 6e-7


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

    from tunelab.train.prepare import zero_stage

    fields = {k: SimpleNamespace(**v) for k, v in plugin.items()}
    if "sharding_strategy" in plugin.get("fsdp_plugin", {}):  # accelerate keeps torch's enum
        fields["fsdp_plugin"].sharding_strategy = ShardingStrategy[plugin["fsdp_plugin"]["sharding_strategy"]]
    assert zero_stage(SimpleNamespace(distributed_type=DistributedType[kind], **fields)) == stage


def test_a_launch_asking_for_fsdp_that_accelerate_runs_as_ddp_is_named():
    """Measured with accelerate 1.15: `accelerate launch --use_fsdp --num_processes 2` on CPUs gives
    DistributedType.MULTI_CPU (plain DDP over gloo); FSDP is set only for GPU-like devices."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from tunelab.train.prepare import unsharded_notice

    cpu = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU)
    assert "asked for FSDP but Accelerate runs it as MULTI_CPU" in unsharded_notice(cpu, {"ACCELERATE_USE_FSDP": "true"})
    assert "DeepSpeed" in unsharded_notice(cpu, {"ACCELERATE_USE_DEEPSPEED": "true"})
    assert unsharded_notice(cpu, {}) is None
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP)
    assert unsharded_notice(fsdp, {"ACCELERATE_USE_FSDP": "true"}) is None
