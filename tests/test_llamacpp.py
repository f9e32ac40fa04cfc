"""llama.cpp itself (llama-cpp-python, built from source by the `llamacpp` extra) loads tunelab's GGUF exports,
the full model (f32, f16, q8_0) and a LoRA GGUF on its base, and picks the tokens tunelab's engine picks.

Each comparison runs llama.cpp along the engine's greedy tokens (teacher forcing) and checks its argmax at every
position: equal at every position is the same as equal greedy output, and a position where they differ is
reported with tunelab's own logit margin between the two picks. A pick may differ only at a near-tie (TIE).
"""

import numpy as np
import pytest
import torch

from tunelab.export import export
from tunelab.infer import Request, SamplingParams, chat_prompt, load_engine

llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp round trips need the llamacpp extra (see Makefile)")

MODEL = "smollm2-135m-instruct"
PROMPTS = [
    [{"role": "user", "content": "Explain why the sky is blue in three sentences."}],
    [{"role": "user", "content": "Write a short poem about a cat who loves the rain."}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "List three uses of a paperclip."}],
]
NEW_TOKENS = 32
# A llama.cpp pick may differ from tunelab's only where tunelab's logits of the two tokens are this close.
# f16 weights: llama.cpp also rounds activations to f16 in its matmuls; q8_0: it quantises them to 8 bits.
TIE = {"f16": 0.05, "q8_0": 0.15}
# max |logit difference| / max |logit| allowed over all positions (measured: f16 1.8e-3, q8_0 4.1e-2)
REL = {"f16": 1e-2, "q8_0": 0.1}
LORA_STD = 0.04  # std of the random LoRA B matrices: enough to change every prompt's greedy output


def llama(path, lora=None, **kw):
    """A llama.cpp model on 2 threads, its own log quiet."""
    return llama_cpp.Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_threads=2,
                           n_ctx=256, logits_all=False, verbose=False, **kw)


def llama_logits(llm, ids: list[int], tokens: list[int]) -> np.ndarray:
    """llama.cpp's next-token logits after `ids` and after each of `tokens` but the last. # (len(tokens), V)"""
    llm.reset()
    rows = []
    for chunk in [ids, *([t] for t in tokens[:-1])]:
        llm.eval(chunk)
        rows.append(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy())
    return np.stack(rows)


def hf_logits(model, ids: list[int], tokens: list[int]) -> np.ndarray:
    """The same rows from a transformers model in one forward pass. # (len(tokens), V)"""
    with torch.no_grad():
        out = model(torch.tensor([ids + tokens[:-1]])).logits[0, len(ids) - 1:]
    return out.float().numpy()


def prompt_ids(tokenizer, llm, messages) -> list[int]:
    """The chat prompt's token ids, after checking llama.cpp's tokenizer (read from the GGUF) gives the same."""
    text = chat_prompt(tokenizer, messages)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text
    return ids


def compare(tokens: list[int], ours: np.ndarray, theirs: np.ndarray, tie: float, rel: float) -> dict:
    """Check llama.cpp's pick (argmax of `theirs`) against tunelab's `tokens`; a different pick must be a near-tie
    in tunelab's logits `ours`. Returns what was measured, printed by the tests."""
    picks = theirs.argmax(-1)
    differ = [i for i, (t, p) in enumerate(zip(tokens, picks)) if t != p]
    gaps = [abs(float(ours[i, tokens[i]] - ours[i, picks[i]])) for i in differ]
    assert all(g < tie for g in gaps), f"positions {differ}: tunelab's margins {gaps} are not near-ties (< {tie})"
    err = float(np.abs(theirs - ours).max() / np.abs(ours).max())
    first = differ[0] if differ else len(tokens)
    got = {"equal_prefix": first, "differ": len(differ), "gaps": [round(g, 4) for g in gaps], "rel_logit_err": err}
    print(got)
    assert err < rel, got
    return got


def greedy(engine, adapter: str | None = None) -> list[list[int]]:
    """The engine's greedy tokens on PROMPTS (NEW_TOKENS each, past an end of sequence too)."""
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    reqs = [Request(p, adapter=adapter, params=params) for p in PROMPTS]
    return [c.token_ids for c in engine.generate(reqs)]


def check_prompts(outs: list[list[int]], tokenizer, hf_model, llm, quant: str) -> None:
    """Each prompt's engine tokens `outs` against llama.cpp's picks; `hf_model` gives tunelab's margins."""
    for messages, tokens in zip(PROMPTS, outs):
        ids = prompt_ids(tokenizer, llm, messages)
        compare(tokens, hf_logits(hf_model, ids, tokens), llama_logits(llm, ids, tokens), TIE[quant], REL[quant])


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A LoRA on the bundled base, every linear layer, B drawn at random (PEFT starts it at zero)."""
    from peft import LoraConfig, get_peft_model

    from tunelab.models import load_model

    model, _ = load_model(MODEL, dtype="fp32")
    torch.manual_seed(0)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=LORA_STD)
    folder = tmp_path_factory.mktemp("lora") / "ad"
    peft.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def engine(adapter):
    return load_engine(MODEL, adapters={"ad": str(adapter)}, dtype="fp32", device="cpu", max_batch=8)


@pytest.fixture(scope="module")
def base_outs(engine):
    return greedy(engine)


@pytest.fixture(scope="module")
def f16(tmp_path_factory):
    res = export(MODEL, tmp_path_factory.mktemp("gguf") / "f16", "gguf", quant="f16")
    return res.out / res.info["gguf_file"]


@pytest.mark.slow
def test_f16_export_greedy_equals_the_engine(engine, base_outs, f16):
    llm = llama(f16)
    try:
        check_prompts(base_outs, engine.tokenizer, engine.model, llm, "f16")
    finally:
        llm.close()


@pytest.mark.slow
def test_q8_0_export_greedy_equals_the_engine_on_the_same_file(tmp_path):
    """tunelab's engine runs the q8_0 file itself (transformers dequantises it), so both sides hold the same
    weights and only llama.cpp's 8-bit activations differ."""
    res = export(MODEL, tmp_path / "q8", "gguf", quant="q8_0")
    path = res.out / res.info["gguf_file"]
    engine = load_engine(str(path), dtype="fp32", device="cpu", max_batch=4)
    llm = llama(path)
    try:
        check_prompts(greedy(engine), engine.tokenizer, engine.model, llm, "q8_0")
    finally:
        llm.close()


@pytest.mark.slow
def test_lora_gguf_on_the_f16_base_equals_the_engine_with_the_adapter(engine, base_outs, adapter, f16, tmp_path):
    from peft import PeftModel

    from tunelab.models import load_model

    res = export(str(adapter), tmp_path / "lora", "gguf-lora", model=MODEL)
    peft = PeftModel.from_pretrained(load_model(MODEL, dtype="fp32")[0], str(adapter)).eval()
    with_lora = greedy(engine, adapter="ad")
    assert all(a != b for a, b in zip(with_lora, base_outs)), "the adapter does not change every prompt's output"
    llm = llama(f16, lora=res.out / res.info["gguf_file"])
    try:
        check_prompts(with_lora, engine.tokenizer, peft, llm, "f16")
    finally:
        llm.close()


def test_tiny_llama_f32_export_matches_transformers_logits(tiny_model_dir, tmp_path):
    """A tiny random Llama (the bundled tokenizer) in f32: llama.cpp's logits equal transformers' to 1e-5."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = export(str(tiny_model_dir), tmp_path / "g", "gguf", quant="f32")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    llm = llama(res.out / res.info["gguf_file"], type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    try:
        ids = prompt_ids(tok, llm, PROMPTS[0])
        with torch.no_grad():
            tokens = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
        # measured 3e-7 (f32 weights and KV cache); without the Q/K row permutation it is 6e-3
        compare(tokens, hf_logits(model, ids, tokens), llama_logits(llm, ids, tokens), tie=1e-3, rel=1e-5)
    finally:
        llm.close()


LLAMA_FTYPES = {"q8_0": 7, "q5_0": 8, "q5_1": 9, "q4_1": 3, "q4_0": 2}  # llama.cpp's LLAMA_FTYPE_MOSTLY_*


# each type once (15-20 s a case on 2 cores), on a tied and an untied model between them
@pytest.mark.parametrize("model_dir,quant", [("tiny_model_dir", "q8_0"), ("tiny_model_dir", "q5_0"),
                                             ("tiny_model_dir", "q4_1"), ("untied_dir", "q5_1"),
                                             ("untied_dir", "q4_0")])
def test_quantized_export_equals_llama_cpps_own_quantizer(model_dir, quant, request, tmp_path):
    """tunelab's q8_0/q5/q4 file holds what llama.cpp's quantizer makes of tunelab's f32 export: the same GGML
    type per tensor (the head, token_embd when tied, at q8_0 for 4/5 bits) and the same bytes."""
    import ctypes

    from gguf import GGUFReader

    folder = str(request.getfixturevalue(model_dir))
    f32 = export(folder, tmp_path / "f32", "gguf", quant="f32")
    ours = export(folder, tmp_path / "ours", "gguf", quant=quant)
    theirs = tmp_path / "theirs.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = LLAMA_FTYPES[quant], 1
    src = f32.out / f32.info["gguf_file"]
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
    a = {t.name: t for t in GGUFReader(ours.out / ours.info["gguf_file"]).tensors}
    b = {t.name: t for t in GGUFReader(theirs).tensors}
    assert {n: t.tensor_type.name for n, t in a.items()} == {n: t.tensor_type.name for n, t in b.items()}
    differ = [n for n in a if not np.array_equal(a[n].data, b[n].data)]
    assert not differ, f"{quant}: tensors whose bytes differ from llama.cpp's: {differ}"
