"""tunelab merge through mergekit: full models, task vectors, slerp, stacking, a YAML as it is, base+adapter."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunelab.errors import TunelabError
from tunelab.merge import build_config, merge, merge_models, unload_adapter
from tunelab.runs import lineage

Q = "model.layers.1.self_attn.q_proj.weight"
TASK_VECTOR_METHODS = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "della", "model_stock")


def save_tiny(folder: Path, tokenizer, seed: int, arch: str = "llama", **overrides) -> Path:
    from tunelab.models import tiny_model

    model, tok = tiny_model(arch, tokenizer=tokenizer, seed=seed, **overrides)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def parents(out: Path) -> dict[str, str]:
    """The merge's direct registry parents: role -> kind."""
    return {p["role"]: p["kind"] for p in lineage(str(out))["parents"]}


def generates(folder: Path) -> torch.Tensor:
    """Load an HF folder in transformers and greedily generate 4 tokens; returns the new ids."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([[1, 400, 500, 600]])
    with torch.no_grad():
        new = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=2)[0, 4:]
    assert new.shape == (4,)
    return new


@pytest.fixture(scope="module")
def trio(tmp_path_factory, tokenizer):
    """Three tiny Llamas of one shape with different random weights: the base m1 and m2, m3."""
    root = tmp_path_factory.mktemp("models")
    return tuple(save_tiny(root / f"m{s}", tokenizer, seed=s) for s in (1, 2, 3))


def test_linear_is_the_normalised_weighted_average(trio, tmp_path):
    m1, m2, _ = trio
    res = merge_models(build_config("linear", [str(m1), str(m2)], weights=[3, 1]), tmp_path / "lin",
                       show_progress=False)
    a, b, out = weights(m1), weights(m2), weights(res.out)
    for key in (Q, "model.embed_tokens.weight"):
        torch.testing.assert_close(out[key], (3 * a[key] + b[key]) / 4)
    assert parents(res.out) == {"model:m1": "base_model", "model:m2": "base_model"}
    manifest = json.loads((res.out / "merge.json").read_text())
    assert manifest["method"] == "linear" and len(manifest["made_from"]) == 2
    assert (res.out / "tokenizer.json").is_file() and (res.out / "mergekit_config.yml").is_file()


def test_slerp_ends_are_the_two_models_through_the_cli(tunelab, trio, tmp_path):
    m1, m2, _ = trio
    got = {}
    for t in ("0", "1", "0.5"):
        code, out, err = tunelab("merge", "--method", "slerp", "--models", f"{m1},{m2}", "--t", t,
                                 "--out", tmp_path / t)
        assert code == 0, err
        assert f"wrote model {tmp_path / t}" in out
        got[t] = weights(tmp_path / t)[Q]
    torch.testing.assert_close(got["0"], weights(m1)[Q], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got["1"], weights(m2)[Q], atol=1e-6, rtol=1e-5)
    assert (got["0.5"] - got["0"]).abs().max() > 1e-3 and (got["0.5"] - got["1"]).abs().max() > 1e-3
    assert parents(tmp_path / "0") == {"base:m1": "base_model", "model:m2": "base_model"}


@pytest.mark.parametrize("method", TASK_VECTOR_METHODS)
def test_task_vector_methods_merge_load_and_generate(method, trio, tmp_path):
    m1, m2, m3 = trio
    density = 0.5 if method in ("ties", "dare_ties", "dare_linear", "breadcrumbs", "della") else None
    cfg = build_config(method, [str(m2), str(m3)], base=str(m1), weights=None if method == "model_stock" else
                       [0.6, 0.4], density=density)
    res = merge_models(cfg, tmp_path / method, show_progress=False)
    base, out = weights(m1), weights(res.out)
    assert out.keys() == base.keys()
    assert all(torch.isfinite(v).all() for v in out.values())
    assert (out[Q] - base[Q]).abs().max() > 1e-4  # the deltas moved the base
    if method == "task_arithmetic":  # no pruning, no normalising: base + sum of weighted deltas, exactly
        want = base[Q] + 0.6 * (weights(m2)[Q] - base[Q]) + 0.4 * (weights(m3)[Q] - base[Q])
        torch.testing.assert_close(out[Q], want, atol=1e-6, rtol=1e-5)
    generates(res.out)
    assert set(parents(res.out)) == {"base:m1", "model:m2", "model:m3"}


def test_dare_is_reproducible_by_seed(trio, tmp_path):
    m1, m2, m3 = trio
    cfg = build_config("dare_ties", [str(m2), str(m3)], base=str(m1), density=0.5)
    runs = {name: weights(merge_models(cfg, tmp_path / name, seed=seed, show_progress=False).out)[Q]
            for name, seed in (("a", 7), ("b", 7), ("c", 8))}
    assert torch.equal(runs["a"], runs["b"]) and not torch.equal(runs["a"], runs["c"])


def test_passthrough_stacks_layers(tunelab, trio, tmp_path):
    from transformers import AutoModelForCausalLM

    m1, m2, _ = trio
    code, out, err = tunelab("merge", "--method", "passthrough", "--models", m1, "--models", m2,
                             "--layers", "0:2,1:2", "--out", tmp_path / "stack")
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "stack")
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    stacked, top = weights(tmp_path / "stack"), weights(m2)
    torch.testing.assert_close(stacked["model.layers.2.self_attn.q_proj.weight"], top[Q])
    torch.testing.assert_close(stacked["model.layers.0.self_attn.q_proj.weight"],
                               weights(m1)["model.layers.0.self_attn.q_proj.weight"])
    generates(tmp_path / "stack")


def test_a_mergekit_yaml_runs_as_it_is(tunelab, trio, tmp_path):
    m1, m2, _ = trio
    text = (f"merge_method: linear\nmodels:\n  - model: {m1}\n    parameters: {{weight: 0.25}}\n"
            f"  - model: {m2}\n    parameters: {{weight: 0.75}}\ndtype: float32\n# a comment mergekit ignores\n")
    (tmp_path / "config.yaml").write_text(text)
    code, out, err = tunelab("merge", tmp_path / "config.yaml", "--out", tmp_path / "m")
    assert code == 0, err
    assert (tmp_path / "m" / "mergekit_config.yml").read_text() == text  # the file itself, comments and all
    want = 0.25 * weights(m1)[Q] + 0.75 * weights(m2)[Q]
    torch.testing.assert_close(weights(tmp_path / "m")[Q], want)
    code, out, err = tunelab("merge", tmp_path / "config.yaml", "--weights", "1,2", "--out", tmp_path / "m2")
    assert code == 2 and "put --weights in the YAML" in err


def test_base_plus_a_tunelab_adapter(tiny_model_dir, chat_file, tmp_path):
    from tunelab.config.recipe import load_recipe
    from tunelab.train import train

    run = train(load_recipe(None, [
        f"model.spec={tiny_model_dir}", "data.task=null", f"data.train={chat_file}", f"output_dir={tmp_path / 'run'}",
        "train.max_steps=2", "train.batch_size=2", "train.effective_batch=2", "train.max_length=128",
        "validation.every=0", "train.lr=1e-2", "lora.r=4", "lora.alpha=8", "train.precision=fp32"]),
        show_progress=False)
    unloaded = weights(unload_adapter(run, tmp_path / "unloaded").out)
    base = weights(tiny_model_dir)
    # BASE+ADAPTER (mergekit's syntax) and the run folder alone (its base read from run.json) merge the same
    for name, spec in (("plus", f"{tiny_model_dir}+{run}"), ("alone", str(run))):
        res = merge(None, tmp_path / name, models=[spec, str(tiny_model_dir)], method="linear")
        torch.testing.assert_close(weights(res.out)[Q], (unloaded[Q] + base[Q]) / 2, atol=1e-6, rtol=1e-5)
        assert parents(res.out) == {f"model:{tiny_model_dir.name}": "base_model", "adapter:run": "adapter"}
    assert (unloaded[Q] - base[Q]).abs().max() > 1e-4  # the adapter trained: the check above can fail


def test_refusals_name_the_file_field_or_models(trio, tokenizer, tmp_path, monkeypatch):
    m1, m2, _ = trio
    narrow = save_tiny(tmp_path / "narrow", tokenizer, seed=4, hidden_size=32, intermediate_size=64)
    qwen = save_tiny(tmp_path / "qwen", tokenizer, seed=5, arch="qwen2")
    with pytest.raises(TunelabError, match=rf"{m1} has hidden_size 64 but {narrow} has 32"):
        merge_models(build_config("linear", [str(m1), str(narrow)]), tmp_path / "x")
    with pytest.raises(TunelabError, match=r"architecture LlamaForCausalLM but .*qwen has Qwen2ForCausalLM"):
        merge_models(build_config("ties", [str(qwen)], base=str(m1), density=0.5), tmp_path / "x")
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: linear\nmodels: [\n")
    with pytest.raises(TunelabError, match=rf"{bad} is not valid YAML"):
        merge_models(bad, tmp_path / "x")
    bad.write_text(f"models:\n  - model: {m1}\n")
    with pytest.raises(TunelabError, match=rf"{bad}: merge_method: Field required"):
        merge_models(bad, tmp_path / "x")
    bad.write_text(f"merge_method: averaging\nmodels:\n  - model: {m1}\n")
    with pytest.raises(TunelabError, match="merge_method 'averaging' is not a mergekit 0.1.5 method"):
        merge_models(bad, tmp_path / "x")
    with pytest.raises(TunelabError, match="--density .* give it for ties"):
        build_config("ties", [str(m2)], base=str(m1))
    with pytest.raises(TunelabError, match="give --base"):
        build_config("task_arithmetic", [str(m1), str(m2)])
    with pytest.raises(TunelabError, match="ONE other model; got 2"):
        build_config("slerp", [str(m1), str(m2), str(narrow)])
    with pytest.raises(TunelabError, match="--dtype 'fp8'"):
        build_config("linear", [str(m1), str(m2)], dtype="fp8")
    with pytest.raises(TunelabError, match="GGUF file.*--format hf"):
        build_config("linear", ["smollm2-135m-instruct", str(m1)])
    with pytest.raises(TunelabError, match="--svd-rank does not apply to full-model"):
        merge(None, tmp_path / "x", models=[str(m1), str(m2)], method="linear", svd_rank=4)
    with pytest.raises(TunelabError, match="is a full model, not an adapter.*--models"):
        merge([m1, m2], tmp_path / "x")
    assert not (tmp_path / "x").exists()
    for name in [m for m in sys.modules if m == "mergekit" or m.startswith("mergekit.")] or ["mergekit"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if the extra were not installed
    with pytest.raises(TunelabError, match=r"pip install 'tunelab\[merge\]'"):
        merge_models(build_config("linear", [str(m1), str(m2)]), tmp_path / "x")
