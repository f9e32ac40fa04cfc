"""tunelab merge: every add_weighted_adapter method, PEFT's pitfalls refused or fixed, --unload, storage, lineage."""

import json
from pathlib import Path

import pytest
import torch

from tunelab.errors import TunelabError
from tunelab.merge import METHODS, merge, merge_adapters, storage_report, unload_adapter
from tunelab.runs import lineage, roots

MODULE = "base_model.model.model.layers.1.self_attn.q_proj"


def make_adapter(base_dir: Path, out: Path, r: int = 4, seed: int = 0, **lora) -> Path:
    """A LoRA adapter with random A and B (so its delta is not zero), saved as a PEFT folder."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **lora)
    get_peft_model(base, cfg).save_pretrained(out)
    return out


def delta(base_dir: Path, adapter: Path, module: str = MODULE) -> torch.Tensor:
    """The weight delta an adapter folder adds to `module` once reloaded by PEFT (its saved scaling applied)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter))
    return model.get_submodule(module).get_delta_weight("default").detach()


@pytest.fixture(scope="module")
def pair(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return make_adapter(tiny_model_dir, root / "orders", seed=1), make_adapter(tiny_model_dir, root / "shop", seed=2)


def test_cat_of_rslora_adapters_of_different_ranks_is_the_weighted_sum(tiny_model_dir, tmp_path):
    # PEFT copies use_rslora into the merged config, so the reloaded merge would scale by sqrt(12), not 1
    a = make_adapter(tiny_model_dir, tmp_path / "a", r=4, seed=3, use_rslora=True)
    b = make_adapter(tiny_model_dir, tmp_path / "b", r=8, seed=4, use_rslora=True)
    res = merge_adapters([a, b], tmp_path / "m", method="cat", weights=[0.7, 0.3], model=str(tiny_model_dir))
    want = 0.7 * delta(tiny_model_dir, a) + 0.3 * delta(tiny_model_dir, b)
    torch.testing.assert_close(delta(tiny_model_dir, res.out), want, atol=1e-6, rtol=1e-5)
    cfg = json.loads((res.out / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["use_rslora"]) == (12, False)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["adapter_config.json",
                                                                 "adapter_model.safetensors", "merge.json"]
    parents = {n["name"] for n in roots(lineage(str(res.out))).get("adapter", [])}
    assert parents == {"a", "b"}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_writes_a_reloadable_adapter(method, pair, tiny_model_dir, tmp_path):
    svd_rank = 8 if method.endswith("svd") else None  # rank 4 + rank 4: kept whole, the svd is exact
    res = merge_adapters(list(pair), tmp_path / method, method=method, density=0.5, svd_rank=svd_rank,
                         model=str(tiny_model_dir))
    d = delta(tiny_model_dir, res.out)
    assert d.shape == (64, 64) and d.abs().sum() > 0
    if method in ("linear", "cat", "svd"):  # no pruning: cat and svd (full rank kept) are the exact sum
        exact = delta(tiny_model_dir, pair[0]) + delta(tiny_model_dir, pair[1])
        if method != "linear":  # linear sums A and B separately: cross terms, by design an approximation
            torch.testing.assert_close(d, exact, atol=1e-5, rtol=1e-4)


def test_pitfalls_are_refused_with_the_fix(pair, tiny_model_dir, tmp_path):
    big = make_adapter(tiny_model_dir, tmp_path / "big", r=8, seed=5)
    with pytest.raises(TunelabError, match=r"equal rank; got orders r=4, big r=8"):
        merge_adapters([pair[0], big], tmp_path / "x", method="ties", density=0.5)
    with pytest.raises(TunelabError, match="already the name of an input adapter"):
        merge_adapters(list(pair), tmp_path / "x", name="orders")
    with pytest.raises(TunelabError, match="--density"):
        merge_adapters(list(pair), tmp_path / "x", method="dare_ties")
    dora = make_adapter(tiny_model_dir, tmp_path / "dora", seed=6, use_dora=True)
    with pytest.raises(TunelabError, match="DoRA.*--unload"):
        merge_adapters([pair[0], dora], tmp_path / "x")
    pattern = make_adapter(tiny_model_dir, tmp_path / "pat", seed=7, rank_pattern={"v_proj": 2})
    with pytest.raises(TunelabError, match="rank_pattern.*cat"):
        merge_adapters([pair[0], pattern], tmp_path / "x", method="linear")
    assert not (tmp_path / "x").exists()
    res = merge_adapters([pair[0], pattern], tmp_path / "ok", method="cat")  # cat lines per-module ranks up
    torch.testing.assert_close(delta(tiny_model_dir, res.out, MODULE.replace("q_proj", "v_proj")),
                               delta(tiny_model_dir, pair[0], MODULE.replace("q_proj", "v_proj"))
                               + delta(tiny_model_dir, pattern, MODULE.replace("q_proj", "v_proj")),
                               atol=1e-5, rtol=1e-4)


def test_unload_keeps_the_base_dtype_and_the_adapter_outputs(tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunelab.models import tiny_model

    model, tok = tiny_model("llama", tokenizer=tokenizer, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    adapter = make_adapter(tmp_path / "base", tmp_path / "ad", seed=8)
    res = unload_adapter(adapter, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(res.out)
    assert res.info["dtype"] == "bfloat16" and merged.dtype == torch.bfloat16
    ids = torch.tensor([[1, 400, 500, 600]])
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), str(adapter))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, ref(ids).logits, atol=2e-2, rtol=2e-2)
    assert (res.out / "tokenizer.json").is_file() and (res.out / "merge.json").is_file()


def test_storage_report_is_measured_from_the_files(pair, tiny_model_dir, tmp_path):
    rep = storage_report(str(tiny_model_dir), list(pair), tenants=100)
    base = (tiny_model_dir / "model.safetensors").stat().st_size
    adapter = (pair[0] / "adapter_model.safetensors").stat().st_size
    assert rep.base_bytes == base and rep.adapter_bytes == [adapter, adapter]
    assert rep.with_adapters == base + 100 * adapter and rep.merged_total == 100 * base
    res = merge([pair[0]], tmp_path / "full", unload=True, tenants=3)
    assert res.storage.merged_bytes == (res.out / "model.safetensors").stat().st_size


def test_cli_merge(tunelab, pair, tmp_path):
    code, out, err = tunelab("merge", *pair, "--method", "ties", "--density", "0.5", "--weights", "1,0.5",
                             "--out", tmp_path / "m", "--tenants", "10")
    assert code == 0, err
    assert "storage for 10 tenants" in out and (tmp_path / "m" / "adapter_model.safetensors").is_file()
    code, out, err = tunelab("merge", *pair, "--out", tmp_path / "m2", "--method", "nope")
    assert code == 2 and "choose one of" in err
