"""tunelab.models: resolving specs, loading errors, GGUF conversion (atomic, cached), dtype rules, tiny models."""

import importlib.util
import json
import time
import warnings
from pathlib import Path

import pytest
import torch

from tunelab.config.paths import DEFAULT_MODEL
from tunelab.errors import TunelabError
from tunelab.models import (
    bundled_gguf_path,
    convert_gguf,
    dtypes,
    identity,
    load,
    load_config,
    load_model,
    load_tokenizer,
    resolve,
    resolve_dtype,
    same_model,
    tiny_model,
)


@pytest.fixture()
def home(tmp_path, monkeypatch):
    """A private, empty TUNELAB_HOME so conversions land in tmp_path."""
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


# ---- resolve --------------------------------------------------------------------------------------------

def test_resolve_bundled_alias_any_case():
    src = resolve("SmolLM2-135M-Instruct")
    assert src.kind == "bundled" and src.spec == DEFAULT_MODEL
    assert src.path == bundled_gguf_path() and src.path.suffix == ".gguf" and src.path.is_file()
    assert src.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_resolve_hf_folder_and_config_path(tiny_model_dir):
    assert resolve(str(tiny_model_dir)).kind == "hf_dir"
    src = resolve(str(tiny_model_dir / "config.json"))
    assert (src.kind, src.path) == ("hf_dir", tiny_model_dir)


def test_resolve_gguf_file_and_folder_with_one_gguf(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"x")
    assert resolve(str(tmp_path / "m.gguf")).kind == "gguf"
    src = resolve(str(tmp_path))
    assert (src.kind, src.path) == ("gguf", tmp_path / "m.gguf")
    (tmp_path / "n.gguf").write_bytes(b"x")
    with pytest.raises(TunelabError, match="2 .gguf files: name one"):
        resolve(str(tmp_path))


def test_resolve_hub_id():
    src = resolve("Qwen/Qwen2.5-0.5B-Instruct")
    assert (src.kind, src.hub_id, src.path) == ("hub", "Qwen/Qwen2.5-0.5B-Instruct", None)


@pytest.mark.parametrize("spec, words", [
    ("not a model", ["unknown model spec", DEFAULT_MODEL, "org/name"]),
    ("./no/such/folder", ["not found", DEFAULT_MODEL]),
    ("missing.gguf", ["not found", ".gguf"]),
])
def test_resolve_unknown_spec_names_the_fix(spec, words):
    with pytest.raises(TunelabError) as e:
        resolve(spec)
    for w in words:
        assert w in str(e.value)


def test_folder_without_config_json(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(TunelabError, match="no config.json"):
        resolve(str(tmp_path))


def test_hub_id_not_cached_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for fn in (load_config, load_tokenizer, load_model):
        with pytest.raises(TunelabError, match="not in the local Hugging Face cache") as e:
            fn("tunelab-tests/definitely-not-cached")
        assert "huggingface-cli download" in str(e.value)


# ---- GGUF -----------------------------------------------------------------------------------------------

def test_corrupt_gguf_is_a_clear_error(tmp_path, home):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    with pytest.raises(TunelabError, match="could not read GGUF file .*x.gguf.*corrupt"):
        load_model(str(bad))
    models = home / "models"
    assert not models.exists() or not any(models.iterdir())  # nothing half-written
    with pytest.raises(TunelabError, match="corrupt"):
        load.gguf_metadata(bad)


def test_missing_gguf_package_names_pip_install(tmp_path, monkeypatch, home):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == "gguf" else real(name, *a, **k))
    (tmp_path / "m.gguf").write_bytes(b"x")
    with pytest.raises(TunelabError, match=r"`pip install gguf`"):
        load_model(str(tmp_path / "m.gguf"))


class _Fake:
    """Stand-ins for transformers' GGUF readers: return a tiny model instead of dequantizing 100 MB."""

    def __init__(self, model, tok):
        self.model, self.tok, self.calls = model, tok, 0

    def load_model(self, *a, **k):
        self.calls += 1
        return self.model

    def load_tok(self, *a, **k):
        return self.tok


@pytest.fixture()
def fake_gguf_readers(monkeypatch, tokenizer):
    import transformers

    model, tok = tiny_model("llama", tokenizer=tokenizer)
    fake = _Fake(model, tok)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake.load_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake.load_tok)
    return fake


@pytest.fixture()
def header_only_gguf(tmp_path):
    """A real GGUF file with metadata and no tensors (the weights come from `fake_gguf_readers`)."""
    import gguf

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-test")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_convert_gguf_is_atomic_and_cached(tmp_path, monkeypatch, fake_gguf_readers, header_only_gguf):
    gguf_file = header_only_gguf
    out = tmp_path / "models" / "conv"
    real_save, fail = fake_gguf_readers.tok.save_pretrained, [True]

    def save_tokenizer(*a, **k):  # runs after the weights are written into the temp folder
        if fail[0]:
            raise OSError("disk full")
        return real_save(*a, **k)

    monkeypatch.setattr(fake_gguf_readers.tok, "save_pretrained", save_tokenizer)
    with pytest.raises(OSError, match="disk full"):
        convert_gguf(gguf_file, out)
    assert list((tmp_path / "models").iterdir()) == []  # no half-written folder, no temp folder

    fail[0] = False
    assert convert_gguf(gguf_file, out) == out
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    assert (out / "tokenizer.json").is_file()
    meta = json.loads((out / "tunelab_source.json").read_text())
    assert meta["source_gguf"] == str(gguf_file) and meta["gguf_metadata"]["general.name"] == "tiny-test"
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["conv"]
    calls = fake_gguf_readers.calls
    t0 = time.perf_counter()
    assert convert_gguf(gguf_file, out) == out  # cached: nothing is read again
    assert fake_gguf_readers.calls == calls and time.perf_counter() - t0 < 0.5


def test_convert_gguf_when_another_process_wins_the_race(tmp_path, monkeypatch, fake_gguf_readers,
                                                         header_only_gguf):
    out = tmp_path / "models" / "conv"
    real_save = fake_gguf_readers.model.save_pretrained

    def save_and_race(folder, **kw):  # another process finishes the same conversion meanwhile
        real_save(folder, **kw)
        real_save(out, **kw)

    monkeypatch.setattr(fake_gguf_readers.model, "save_pretrained", save_and_race)
    assert convert_gguf(header_only_gguf, out) == out
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["conv"]


def test_bundled_gguf_metadata_comes_from_the_conversion(tokenizer):
    t0 = time.perf_counter()  # the `tokenizer` fixture converted the bundled model into TUNELAB_HOME
    meta = load.gguf_metadata(bundled_gguf_path())
    assert time.perf_counter() - t0 < 0.5  # parsing the GGUF itself takes seconds
    assert "smollm2" in meta["general.name"].lower()


# ---- identity (adapter/base checks) ---------------------------------------------------------------------

def test_identity_and_same_model(tiny_model_dir, tmp_path):
    rec = identity(str(tiny_model_dir))
    assert rec["kind"] == "hf_dir" and len(rec["hash"]) == 16
    assert same_model(rec, str(tiny_model_dir / "config.json")) is True  # another spec, same weights
    assert same_model(rec, DEFAULT_MODEL) is False
    assert same_model({"spec": "gone/elsewhere"}, str(tiny_model_dir)) is None  # nothing to compare


# ---- dtypes ---------------------------------------------------------------------------------------------

class _Cfg:
    def __init__(self, dtype):
        self.dtype = dtype


def test_dtype_checkpoint_and_explicit():
    assert resolve_dtype("checkpoint", _Cfg(torch.bfloat16)) == torch.bfloat16
    assert resolve_dtype("checkpoint", _Cfg("float16")) == torch.float16
    assert resolve_dtype("checkpoint", _Cfg(None)) == torch.float32
    assert resolve_dtype("checkpoint") == torch.float32
    assert resolve_dtype("fp32", _Cfg(torch.bfloat16)) == torch.float32
    with pytest.raises(TunelabError, match="checkpoint, auto, bf16, fp16, fp32"):
        resolve_dtype("float8")


@pytest.mark.parametrize("fast", [True, False])
def test_dtype_auto_picks_bf16_iff_fast(monkeypatch, fast):
    monkeypatch.setattr(dtypes, "cpu_has_fast_bf16", lambda: fast)
    want = torch.bfloat16 if fast else torch.float32
    assert resolve_dtype("auto", _Cfg(torch.float32), device="cpu") == want


def test_dtype_auto_matches_this_cpu():
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fast = " avx512_bf16" in flags or " amx_bf16" in flags
    assert dtypes.cpu_has_fast_bf16() is fast
    assert resolve_dtype("auto", device="cpu") == (torch.bfloat16 if fast else torch.float32)


def test_fp16_on_bf16_checkpoint_warns_loudly():
    with pytest.warns(UserWarning, match="PRECISION MISMATCH.*bf16"):
        assert resolve_dtype("fp16", _Cfg(torch.bfloat16)) == torch.float16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_dtype("fp16", _Cfg(torch.float32)) == torch.float16  # no warning otherwise


# ---- tiny models and loading ----------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_model_forward(arch, tokenizer):
    model, tok = tiny_model(arch, tokenizer=tokenizer)
    assert model.config.model_type == arch and model.config.hidden_size == 64
    ids = tok("Ada wants 3 apples.", return_tensors="pt")["input_ids"]  # (1, T)
    with torch.no_grad():
        logits = model(ids).logits  # (1, T, V)
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()
    again, _ = tiny_model(arch, tokenizer=tokenizer)  # fixed seed: same weights
    assert torch.equal(again(ids).logits, logits)


def test_tiny_model_unknown_arch(tokenizer):
    with pytest.raises(ValueError, match="llama"):
        tiny_model("gpt5", tokenizer=tokenizer)


def test_load_model_from_folder(tiny_model_dir):
    model, tok = load_model(str(tiny_model_dir), dtype="bf16")
    assert model.dtype == torch.bfloat16 and not model.training
    assert model.tunelab_source.kind == "hf_dir" and tok.pad_token is not None


@pytest.mark.slow
def test_bundled_model_loads_fast_and_knows_paris(tiny_model_dir):
    from tunelab.infer import Request, SamplingParams
    from tunelab.infer.engine import BatchEngine

    load_model(str(tiny_model_dir))  # pays the one-time lazy imports (same architecture and tokenizer)
    t0 = time.perf_counter()
    model, tok = load_model(DEFAULT_MODEL)
    seconds = time.perf_counter() - t0
    assert seconds < 3.0, f"loading the cached bundled model took {seconds:.1f}s"
    assert model.num_parameters() > 100e6
    answer = BatchEngine(model, tok).generate([Request([{"role": "user", "content": "What is the capital of France?"}],
                                                       params=SamplingParams(max_new_tokens=16))])[0].text
    assert "Paris" in answer
