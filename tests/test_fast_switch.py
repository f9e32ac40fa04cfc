"""`train.fast_paths`: on and off train the same function, models the packed kernel cannot run fall back, and
importing tunelab changes nothing in the process (the allocator environment is set when a CPU run starts)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tunelab.config.recipe import load_recipe
from tunelab.fast import ALLOCATOR_ENV

ROOT = Path(__file__).resolve().parents[1]

# method -> recipe overrides (dropout off: the fast mask draws other random numbers than nn.Dropout)
METHODS = {
    "lora": ["method=lora"],
    "dora": ["method=dora"],
    "qlora": ["method=qlora", "qlora.compute_dtype=bf16"],
    "prompt": ["method=prompt", "prompt.num_virtual_tokens=4"],
    "full": ["method=full"],
}


def _recipe(model_dir, data, out, fast: str, *extra):
    return load_recipe(None, [f"model.spec={model_dir}", "data.task=null", f"data.train={data}",
                              "train.max_length=96", "train.batch_size=2", "train.effective_batch=2",
                              "train.precision=bf16", "lora.r=4", "lora.alpha=8", "lora.dropout=0",
                              "validation.every=null", "checkpoint_every=null", f"train.fast_paths={fast}",
                              f"output_dir={out}", *extra])


def _first_step(recipe, randomize_lora_b: bool = False):
    """(summed loss, weight, trainable gradients, the run) of the trainer's first micro-batch, as its loop runs it."""
    from tunelab.train.loop import batch_loss, micro_batches
    from tunelab.train.sft import prepare_run

    run = prepare_run(recipe)
    if randomize_lora_b:  # LoRA's B starts at zero (and so would every A gradient)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in run.model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    run.model.train()
    torch.manual_seed(0)
    mb = micro_batches(run, list(range(len(run.sequences))))[0]
    with run.autocast(), run.fast.saving():
        s, w = batch_loss(run.model, mb, run.n_virtual, run.fast.head)
    s.backward()
    run.fast.release()
    grads = {n: p.grad.float().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    return s.detach().float(), w, grads, run


@pytest.mark.parametrize("method", list(METHODS))
def test_fast_paths_on_and_off_give_the_same_loss_and_gradients(tiny_model_dir, chat_file, tmp_path, method):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    results = {fast: _first_step(_recipe(tiny_model_dir, chat_file, tmp_path / fast, fast, *METHODS[method]),
                                 randomize_lora_b=True) for fast in ("on", "off")}
    (s_on, w_on, g_on, run_on), (s_off, w_off, g_off, run_off) = results["on"], results["off"]
    # the switch really switched: fused modules and (packing) the per-example kernel vs plain PEFT/transformers
    fused_on = {type(m).__name__ for m in run_on.model.modules() if type(m).__name__.startswith("Fused")}
    fused_off = {type(m).__name__ for m in run_off.model.modules() if type(m).__name__.startswith("Fused")}
    assert fused_on and not fused_off, (fused_on, fused_off)
    assert run_on.flat == run_on.spec.supports_packing and not run_off.flat
    assert run_on.fast.head is not None and run_off.fast.head is None
    assert w_on.item() == pytest.approx(w_off.item())  # the same tokens, weighed alike
    torch.testing.assert_close(s_on, s_off, rtol=1e-3, atol=0.0)  # bf16 compute (measured: at most 2.3e-5)
    assert g_on.keys() == g_off.keys() and g_on
    for n in g_off:
        ref = g_off[n].norm()
        assert ref > 0, n
        assert (g_on[n] - g_off[n]).norm() <= 0.03 * ref, f"{method} {n}: {(g_on[n] - g_off[n]).norm() / ref:.3f}"


def _gemma2_dir(root: Path, tokenizer) -> Path:
    """A tiny Gemma-2: logit softcapping (attention and final), a 6-token sliding window on alternate layers."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    cfg = Gemma2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                       attn_logit_softcapping=5.0, final_logit_softcapping=3.0, sliding_window=6,
                       query_pre_attn_scalar=16, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def test_gemma2_falls_back_to_transformers_attention_with_the_plain_models_loss(tokenizer, chat_file, tmp_path):
    from tunelab.data import Batches, model_inputs
    from tunelab.fast.attention import PACKED, packed_attention, unsupported_features
    from tunelab.models import load_model
    from tunelab.models.losses import weighted_loss
    from tunelab.train.loop import batch_loss

    folder = _gemma2_dir(tmp_path / "gemma2", tokenizer)
    recipe = _recipe(folder, chat_file, tmp_path / "run", "on", "train.precision=fp32", "method=full")
    s, w, _, run = _first_step(recipe)
    found = unsupported_features(run.model.config, 96)
    assert any("softcapping" in f for f in found) and any("sliding window" in f for f in found)
    assert not run.fast.packed_attention and not run.flat and run.fast.notes  # said so, and took packed rows
    assert run.model.config._attn_implementation != PACKED
    assert run.fast.head is None  # final logit softcapping: the model's own logits
    # the plain model, one example per row with padding: the same summed loss
    model, _ = load_model(str(folder), dtype="fp32")
    rows = [i for row in run.sequences[:2] for i in row]
    padded = next(iter(Batches([run.splits.train[i] for i in rows], len(rows), 96, 2, packing=False)))
    with torch.no_grad():
        logits = model(**model_inputs(padded)).logits
        ref, ref_w = weighted_loss(logits, padded["input_ids"], padded["weights"])
    assert w.item() == pytest.approx(ref_w.item())
    torch.testing.assert_close(s, (ref * ref_w).float(), rtol=1e-4, atol=1e-4)
    # the packed kernel refuses what it would compute differently, rather than train another function
    q = torch.randn(1, 4, 10, 16)
    kv = torch.randn(1, 2, 10, 16)
    with pytest.raises(ValueError, match="softcapping"):
        packed_attention(torch.nn.Module(), q, kv, kv, None, cu_seq_lens_q=torch.tensor([0, 10]), softcap=5.0)
    with pytest.raises(ValueError, match="sliding window"):
        packed_attention(torch.nn.Module(), q, kv, kv, None, cu_seq_lens_q=torch.tensor([0, 10]), sliding_window=6)
    with torch.no_grad():  # a batch the trainer would have made for the kernel reaches it, and is refused too
        from tunelab.fast.attention import use_packed_attention

        use_packed_attention(model)
        flat = next(iter(Batches([run.splits.train[i] for i in rows], 2, 96, 2, packing=True, flat=True)))
        with pytest.raises(ValueError, match="softcapping|sliding window"):
            batch_loss(model, flat, 0)


def _python(code: str, env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


TRAIN_ONE_STEP = """
import json, os
import tunelab, tunelab.train, tunelab.cli, tunelab.fast
seen = {k: os.environ.get(k) for k in tunelab.fast.ALLOCATOR_ENV}
from tunelab.config.recipe import load_recipe
from tunelab.train import train
train(load_recipe(None, %r), show_progress=False, stop_after_steps=1)
import torch
t = torch.empty(64 << 20, dtype=torch.uint8)  # a block torch's allocator puts on huge pages when THP is on
ptr, hg = t.data_ptr(), False
for line in open("/proc/self/smaps"):
    head = line.split()[0]
    if "-" in head and not head.endswith(":"):
        lo, hi = (int(v, 16) for v in head.split("-"))
        inside = lo <= ptr < hi
    elif head == "VmFlags:" and inside:
        hg = "hg" in line.split()[1:]
print(json.dumps({"at_import": seen, "after": {k: os.environ.get(k) for k in tunelab.fast.ALLOCATOR_ENV},
                  "huge_pages": hg}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_import_sets_nothing_and_a_cpu_run_sets_the_allocator_env_unless_the_user_did(tiny_model_dir, chat_file,
                                                                                      tmp_path):
    def overrides(name, fast):
        return [f"model.spec={tiny_model_dir}", "data.task=null", f"data.train={chat_file}", "train.max_length=64",
                "train.batch_size=2", "train.effective_batch=2", "validation.every=null", "checkpoint_every=null",
                f"train.fast_paths={fast}", f"output_dir={tmp_path / name}"]

    on = _python(TRAIN_ONE_STEP % overrides("on", "on"), _clean_env())
    assert on["at_import"] == {k: None for k in ALLOCATOR_ENV}  # importing tunelab (train, cli, fast) sets nothing
    assert on["after"] == ALLOCATOR_ENV
    assert on["huge_pages"]  # set at the run's start, before torch's first allocation: it still takes effect
    off = _python(TRAIN_ONE_STEP % overrides("off", "off"), _clean_env())
    assert off["after"] == {k: None for k in ALLOCATOR_ENV} and not off["huge_pages"]  # plain: untouched
    user = _python(TRAIN_ONE_STEP % overrides("user", "on"), _clean_env(THP_MEM_ALLOC_ENABLE="0"))
    assert user["after"] == {**ALLOCATOR_ENV, "THP_MEM_ALLOC_ENABLE": "0"} and not user["huge_pages"]


def test_fast_paths_auto_is_on_for_a_cpu_only():
    from tunelab.fast import resolve

    assert resolve("auto", "cpu") and not resolve("auto", "cuda:0") and not resolve("auto", "cuda")
    assert resolve("on", "cuda:0") and not resolve("off", "cpu")
    with pytest.raises(ValueError):
        resolve("fast", "cpu")
