"""SFT trainer: every method end to end on a tiny model, artifacts, PEFT loading, resume, bad input."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from tunelab.config.recipe import load_recipe
from tunelab.errors import TunelabError
from tunelab.train import train


def _recipe(model_dir, data, out, *extra):
    return load_recipe(None, [
        f"model.spec={model_dir}", "data.task=null", f"data.train={data}", f"output_dir={out}",
        "train.max_steps=4", "train.batch_size=2", "train.effective_batch=4", "train.max_length=256",
        "validation.every=2", "checkpoint_every=2", "train.lr=1e-3", "lora.r=8", "lora.alpha=16",
        "train.precision=fp32", *extra,
    ])


METHODS = [
    ("lora", []),
    ("dora", ["method=dora"]),
    ("qlora", ["method=qlora", "qlora.compute_dtype=fp32"]),
    ("prompt", ["method=prompt", "prompt.num_virtual_tokens=4", "train.lr=3e-2"]),
    ("full", ["method=full", "train.lr=1e-3", "train.freeze_embeddings=true"]),
]


@pytest.mark.parametrize("name,extra", METHODS, ids=[m[0] for m in METHODS])
def test_every_method_trains_and_writes_artifacts(tiny_model_dir, chat_file, tmp_path, name, extra):
    recipe = _recipe(tiny_model_dir, chat_file, tmp_path / name, *extra)
    out = train(recipe, show_progress=False)
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], f"{name}: loss did not go down: {losses}"
    assert any("val_loss" in r for r in rows)
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "recipe.yaml").is_file() and (out / "tokenizer_config.json").is_file()
    run = json.loads((out / "run.json").read_text())
    assert run["method"] == recipe.method and run["metrics"]["steps"] == 4
    assert run["data"]["train"]["sha256"] and run["base_model"]["hash"]
    assert run["versions"]["torch"] and run["peak_rss_bytes"] > 0 and run["wall_time_s"] > 0
    if recipe.method == "full":
        assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    else:
        assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert len(list(out.glob("checkpoint-*"))) <= recipe.keep_last
    if name == "dora":  # a silent fallback to plain LoRA has no magnitude vectors
        from safetensors.torch import load_file

        magnitudes = [k for k in load_file(str(out / "adapter_model.safetensors")) if "lora_magnitude_vector" in k]
        assert magnitudes and json.loads((out / "adapter_config.json").read_text())["use_dora"]
    if name == "qlora":  # what the trainer trains: LoRA over NF4 4-bit linear layers
        import bitsandbytes as bnb

        from tunelab.train.sft import prepare_run

        model = prepare_run(_recipe(tiny_model_dir, chat_file, tmp_path / "qlora-setup", *extra)).model
        lora_layers = [m for m in model.modules() if hasattr(m, "lora_A")]
        assert lora_layers and all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in lora_layers)
        assert all(m.base_layer.weight.quant_state.quant_type == "nf4" for m in lora_layers)


@pytest.mark.parametrize("name,extra", [METHODS[0], METHODS[3], METHODS[4]], ids=["lora", "prompt", "full"])
def test_every_method_trains_under_bf16_autocast(tiny_model_dir, chat_file, tmp_path, name, extra):
    """bf16 is the default on this CPU: PEFT methods keep bf16 base weights, full finetuning fp32 master
    weights under autocast (rotary then leaves q/k in fp32 and v in bf16 inside the packed attention)."""
    recipe = _recipe(tiny_model_dir, chat_file, tmp_path / name, *extra, "train.precision=bf16",
                     "validation.every=null", "checkpoint_every=null")
    out = train(recipe, show_progress=False)
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], f"{name}: loss did not go down: {losses}"


def test_adapter_loads_in_plain_peft_with_same_logits(tiny_model_dir, chat_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunelab.infer import load_engine

    out = train(_recipe(tiny_model_dir, chat_file, tmp_path / "run"), show_progress=False)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, str(out)).eval()
    ours = load_engine(str(tiny_model_dir), [out], dtype="fp32", kind="generate").model
    x = torch.tensor([[1, 50, 60, 70, 80, 90]])
    with torch.no_grad():
        a, b = plain(input_ids=x).logits, ours(input_ids=x).logits
    assert torch.allclose(a, b, atol=1e-5)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        assert not torch.allclose(fresh(input_ids=x).logits, a, atol=1e-4), "the adapter changed nothing"


RESUME_CASES = {
    "plain": ["train.packing=false", "validation.every=null"],
    "packed+validation": ["train.packing=true", "validation.every=2"],
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_after_sigkill_gives_the_same_losses(tiny_model_dir, chat_file, tmp_path, case):
    args = [f"model.spec={tiny_model_dir}", "data.task=null", f"data.train={chat_file}",
            "train.max_steps=8", "train.batch_size=2", "train.effective_batch=4", "train.max_length=128",
            "checkpoint_every=3", "train.precision=fp32", "train.lr=1e-3", "lora.dropout=0.1", *RESUME_CASES[case]]
    ref = train(load_recipe(None, [*args, f"output_dir={tmp_path / 'ref'}"]), show_progress=False)
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "train", *args, f"output_dir={killed}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoint-0000003" / "state.json").exists():
        assert proc.poll() is None, "training exited before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapter_model.safetensors").exists(), "the run finished before it was killed"
    with pytest.raises(TunelabError, match="--resume"):
        train(load_recipe(None, [*args, f"output_dir={killed}"]), show_progress=False)
    train(load_recipe(None, [*args, f"output_dir={killed}"]), resume=True, show_progress=False)

    def losses(folder, key):
        rows = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
        return [(r["step"], r[key]) for r in rows if key in r]

    a, b = losses(ref, "loss"), losses(killed, "loss")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 9))
    for (s, x), (_, y) in zip(a, b):
        assert abs(x - y) < 1e-4, f"step {s}: {x} vs {y}"
    assert losses(ref, "tokens") == losses(killed, "tokens")  # the token count carries over the resume
    assert losses(ref, "computed_tokens") == losses(killed, "computed_tokens")
    va, vb = losses(ref, "val_loss"), losses(killed, "val_loss")
    assert [s for s, _ in va] == [s for s, _ in vb] == ([0, 2, 4, 6, 8] if case != "plain" else [0, 8])
    for (s, x), (_, y) in zip(va, vb):
        assert abs(x - y) < 1e-4, f"validation at step {s}: {x} vs {y}"


def test_early_stopping_ends_with_the_best_steps_adapter(tiny_model_dir, chat_file, tmp_path, capsys):
    """Validation gets worse after its best step: the run stops early and saves that step's adapter, byte for
    byte the one in its checkpoint (kept through pruning), and says so in the log and run.json."""
    from safetensors.torch import load_file

    recipe = _recipe(tiny_model_dir, chat_file, tmp_path / "es", "train.max_steps=10", "validation.every=1",
                     "validation.patience=2", "checkpoint_every=1", "keep_last=1", "lora.dropout=0",
                     "train.lr=0.02", "train.warmup_ratio=0")
    from tunelab.cli._output import showing

    with showing():  # what `tunelab train` prints
        out = train(recipe, show_progress=False)
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    best_step, best = 0, float("inf")
    for r in rows:
        if "val_loss" in r and r["val_loss"] < best - 1e-4:  # the monitor's rule
            best_step, best = r["step"], r["val_loss"]
    metrics = json.loads((out / "run.json").read_text())["metrics"]
    assert metrics["stopped_early"] and 0 < best_step < metrics["steps"], rows
    assert metrics["restored_best_step"] == best_step and metrics["final_val_loss"] == pytest.approx(best)
    assert f"restored the weights of step {best_step}" in capsys.readouterr().err
    ckpts = sorted(p.name for p in out.glob("checkpoint-*"))
    assert ckpts == sorted({f"checkpoint-{best_step:07d}", f"checkpoint-{metrics['steps']:07d}"})
    saved = load_file(str(out / f"checkpoint-{best_step:07d}" / "trainable.safetensors"))
    last = load_file(str(out / f"checkpoint-{metrics['steps']:07d}" / "trainable.safetensors"))
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert len(adapter) == len(saved)
    for name, value in saved.items():
        assert torch.equal(adapter[name.replace(".default", "")], value), name
    assert any(not torch.equal(last[n], v) for n, v in saved.items()), "the last step changed nothing"


def test_training_prints_plain_progress_lines_when_not_a_terminal(tiny_model_dir, chat_file, tmp_path, capsys):
    from tunelab.cli._output import showing

    with showing():  # what `tunelab train` prints: the CLI installs the progress rendering
        train(_recipe(tiny_model_dir, chat_file, tmp_path / "p", "validation.every=null", "checkpoint_every=null"),
              show_progress=True)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("step ")]
    assert [ln.split()[1] for ln in lines] == ["1/4", "2/4", "3/4", "4/4"], err
    for ln in lines:
        assert re.fullmatch(r"step \d/4 loss \d+\.\d{4} lr \S+ \d+ tok/s elapsed \d+:\d\d:\d\d "
                            r"ETA \d+:\d\d:\d\d", ln), ln
    assert lines[-1].endswith("ETA 0:00:00")


def test_resume_refuses_a_different_recipe(tiny_model_dir, chat_file, tmp_path):
    out = tmp_path / "run"
    train(_recipe(tiny_model_dir, chat_file, out), show_progress=False, stop_after_steps=2)
    with pytest.raises(TunelabError, match="different recipe"):
        train(_recipe(tiny_model_dir, chat_file, out, "train.lr=5e-4"), resume=True, show_progress=False)


def test_unknown_recipe_key_names_the_nearest(tmp_path):
    with pytest.raises(TunelabError, match="did you mean 'lr'"):
        load_recipe(None, ["train.lrr=1e-4"])
    bad = tmp_path / "r.yaml"
    bad.write_text("trian: {lr: 1e-4}\n")
    with pytest.raises(TunelabError, match=r"(?s)r\.yaml.*did you mean 'train'"):
        load_recipe(bad)


def test_missing_target_modules_lists_the_real_ones(tiny_model_dir, chat_file, tmp_path):
    with pytest.raises(TunelabError, match="q_proj"):
        train(_recipe(tiny_model_dir, chat_file, tmp_path / "x", "lora.targets=[query_key_value]"),
              show_progress=False)


def test_empty_dataset_after_filtering(tiny_model_dir, chat_file, tmp_path):
    with pytest.raises(TunelabError, match="empty"):
        train(_recipe(tiny_model_dir, chat_file, tmp_path / "x", "train.max_length=8", "data.too_long=drop"),
              show_progress=False)


def test_qlora_without_bitsandbytes_says_how_to_fix(monkeypatch):
    from tunelab.config.recipe import QLoraConfig
    from tunelab.models.methods import bnb_config

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(TunelabError, match="pip install bitsandbytes"):
        bnb_config(QLoraConfig())


@pytest.mark.slow
def test_lora_on_the_bundled_model_improves_validation_loss(tmp_path):
    recipe = load_recipe(None, [
        "data.task=orders-json", "data.limit_train=24", "data.limit_validation=8", "train.max_steps=4",
        "train.batch_size=2", "train.effective_batch=2", "train.max_length=1024", "train.lr=5e-4",
        "lora.r=8", "lora.alpha=16", "lora.dropout=0", "validation.every=null", "checkpoint_every=null",
        f"output_dir={tmp_path / 'run'}",
    ])
    out = train(recipe, show_progress=False)
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    assert val[0][0] == 0 and val[-1][0] == 4
    assert val[-1][1] < val[0][1] - 0.05, f"validation loss did not improve: {val}"


@pytest.mark.parametrize("ratio", [None, 16.0])
def test_lora_plus_gives_the_b_matrices_ratio_times_the_lr(tiny_llama, ratio):
    from tunelab.config.recipe import LoraConfig, TrainConfig
    from tunelab.models.methods import apply_method
    from tunelab.models.optim import build_optimizer, build_scheduler

    model, _ = tiny_llama
    model = apply_method(model, "lora", LoraConfig(r=4, alpha=8))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    t = TrainConfig(lr=1e-3, warmup_ratio=0.5, schedule="constant")
    opt = build_optimizer(named, t, ratio)
    sched = build_scheduler(opt, t, total_steps=4)  # 2 warmup steps: lr x 1/2 first, then x 1
    for want_scale in (0.5, 1.0):
        lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
        assert len(lr) == len(named)
        for n, p in named:
            want = 1e-3 * want_scale * (ratio if ratio and ".lora_B." in n else 1.0)
            assert lr[id(p)] == pytest.approx(want), n
        opt.step()
        sched.step()
    assert sum(".lora_B." in n for n, _ in named) > 0


def test_the_trainer_passes_lora_plus_ratio_to_the_optimizer(tiny_model_dir, chat_file, tmp_path):
    from safetensors.torch import load_file

    out = train(_recipe(tiny_model_dir, chat_file, tmp_path / "plus", "lora.plus_ratio=16", "train.max_steps=1",
                        "checkpoint_every=1", "validation.every=null"), show_progress=False)
    ckpt = sorted(out.glob("checkpoint-*"))[-1]
    groups = torch.load(ckpt / "optimizer.pt", weights_only=True)["optimizer"]["param_groups"]
    names = list(load_file(str(ckpt / "trainable.safetensors")))  # every trainable parameter
    n_b = sum(".lora_B." in n for n in names)
    sizes = {round(g["initial_lr"], 9): len(g["params"]) for g in groups}
    assert n_b and sizes.pop(round(16e-3, 9)) == n_b  # the B matrices, and only they, at 16 x lr
    assert set(sizes) == {1e-3} and sum(len(g["params"]) for g in groups) == len(names)


@pytest.mark.slow
def test_compiled_layers_train_like_eager_ones(tiny_model_dir, chat_file, tmp_path):
    """train.compile=true (torch.compile per decoder layer, over the fused LoRA/RMSNorm functions)."""
    losses = {}
    for compiled in (False, True):
        recipe = _recipe(tiny_model_dir, chat_file, tmp_path / str(compiled), "train.max_steps=3",
                         "validation.every=null", "checkpoint_every=null", "lora.dropout=0.0",
                         f"train.compile={str(compiled).lower()}")
        out = train(recipe, show_progress=False)
        rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        losses[compiled] = [r["loss"] for r in rows if "loss" in r]
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)


def test_lora_layers_adapts_only_those_layers_and_backward_stops_there(tiny_llama):
    from tunelab.config.recipe import LoraConfig
    from tunelab.models.methods import apply_method

    model, _ = tiny_llama  # 2 decoder layers
    model = apply_method(model, "lora", LoraConfig(r=4, alpha=8, layers=1))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".layers.1." in n for n in names), names
    assert model.peft_config["default"].layers_to_transform == [1]
    layers = model.get_base_model().model.layers
    calls = {0: 0, 1: 0}
    for i in calls:
        layers[i].mlp.register_full_backward_hook(lambda m, gi, go, i=i: calls.__setitem__(i, calls[i] + 1))
    model(input_ids=torch.tensor([[1, 5, 9, 13, 17]]), labels=torch.tensor([[1, 5, 9, 13, 17]])).loss.backward()
    assert calls == {0: 0, 1: 1}, "backward ran through a layer below the lowest adapted one"


@pytest.mark.parametrize("layers,ok", [([0, 1], [0, 1]), (2, [0, 1]), (3, None), ([2], None), (0, None)])
def test_lora_layers_are_checked_against_the_model(layers, ok):
    from tunelab.config.recipe import LoraConfig

    cfg = LoraConfig(layers=layers)
    if ok:
        assert cfg.layer_indices(2) == ok
    else:
        with pytest.raises(TunelabError, match="this model has 2 decoder layers"):
            cfg.layer_indices(2)
