"""The inference engines: batched vs generate give the same tokens (per adapter, per grammar, mixed), token-level
batching, prefix reuse, adapters at run time, stop strings, sampling, fallbacks (the protocol itself:
test_engine_contract.py)."""

import pytest
import torch

from tunelab.errors import TunelabError
from tunelab.infer import Request, SamplingParams, load_engine, resolve_device

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "qty": {"type": "integer"}},
          "required": ["name", "qty"]}


def _req(prompt, adapter=None, **params) -> Request:
    return Request(prompt, adapter, SamplingParams(**params))


def _prompts(n=5):
    return [[{"role": "system", "content": "You are a terse assistant that answers in one line."},
             {"role": "user", "content": f"Item {i}: describe it" + " in detail" * i}] for i in range(n)]


def _save_adapter(model_fn, folder, seed, r, targets, dora=False):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(model_fn(), LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, use_dora=dora,
                                               init_lora_weights=False))
    pm.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tmp_path_factory, tokenizer):
    """A tiny model whose greedy outputs vary (large init) and two LoRA adapters of different ranks."""
    from tunelab.models import tiny_model

    arch = request.param
    root = tmp_path_factory.mktemp(f"infer-{arch}")

    def make():
        return tiny_model(arch, tokenizer=tokenizer, initializer_range=0.4)[0]

    model = make()
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    ads = {"a": _save_adapter(make, root / "a", 1, 4, ["q_proj", "v_proj", "down_proj"]),
           "b": _save_adapter(make, root / "b", 2, 8, ["q_proj", "k_proj", "o_proj", "gate_proj", "up_proj"])}
    return str(root / "model"), ads


def _pair(setup, load_in=None, **kw):
    spec, ads = setup
    fast = load_engine(spec, ads, dtype="fp32", kind="batched", load_in=load_in, **kw)
    ref = load_engine(spec, ads, dtype="fp32", kind="generate", batch_size=1, load_in=load_in)
    return fast, ref


def test_batched_matches_generate_per_adapter_mixed_and_grammar(setup):
    fast, ref = _pair(setup)
    assert type(fast).__name__ == "BatchEngine" and fast.adapters == ["a", "b"]
    for adapter in (None, "a", "b"):
        reqs = [_req(p, adapter=adapter, max_new_tokens=16) for p in _prompts()]
        got, want = fast.generate(reqs), ref.generate(reqs)
        assert [c.token_ids for c in got] == [c.token_ids for c in want], adapter
        assert len({t for c in got for t in c.token_ids}) > 5  # a varied output, not one repeated token
    # the adapters really change the output
    outs = {a: fast.generate([_req(_prompts()[0], adapter=a, max_new_tokens=16)])[0].token_ids
            for a in (None, "a", "b")}
    assert len({tuple(v) for v in outs.values()}) == 3
    mixed = [_req(p, adapter=[None, "a", "b"][i % 3], max_new_tokens=16) for i, p in enumerate(_prompts() * 2)]
    assert [c.token_ids for c in fast.generate(mixed)] == [c.token_ids for c in ref.generate(mixed)]
    grammar = fast.compile_grammar(schema=SCHEMA)
    for adapter in (None, "a", "b"):
        reqs = [_req(p, adapter=adapter, grammar=grammar, max_new_tokens=24) for p in _prompts(3)]
        got, want = fast.generate(reqs), ref.generate(reqs)
        assert [c.token_ids for c in got] == [c.token_ids for c in want], adapter
        assert all(c.text.startswith('{"name":"') for c in got)
    # grammar rows and free rows in one batch
    both = [_req(p, grammar=grammar if i % 2 else None, max_new_tokens=16) for i, p in enumerate(_prompts(4))]
    assert [c.token_ids for c in fast.generate(both)] == [c.token_ids for c in ref.generate(both)]


@pytest.mark.parametrize("path", ["mask", "runs", "grid"])
def test_mixed_adapters_same_tokens_on_every_lora_path(setup, monkeypatch, path):
    """Rows on different adapters: side by side with a mask, one slice per same-adapter run (the engine sorts a
    prefill's sequences by adapter), or gathered per adapter into a grid; each path alone gives generate's tokens."""
    import tunelab.infer.lora as lora

    monkeypatch.setattr(lora, "MASKED_ROWS", 10_000 if path == "mask" else 0)
    monkeypatch.setattr(lora, "MAX_RUNS", 0 if path == "grid" else 10_000)
    seen = []
    monkeypatch.setattr(lora.MultiLoraLinear, "forward", _spy(lora.MultiLoraLinear.forward, seen))
    fast, ref = _pair(setup)
    mixed = [_req(p, adapter=[None, "a", "b"][i % 3], max_new_tokens=12) for i, p in enumerate(_prompts(6))]
    assert [c.token_ids for c in fast.generate(mixed)] == [c.token_ids for c in ref.generate(mixed)]
    assert seen and set(seen) == {path}


def _spy(forward, seen):
    def wrapped(self, x):
        g = self.state.groups
        if g is not None and g.adapters and g.single is None:
            seen.append("mask" if g.mask is not None else "runs" if g.runs is not None else "grid")
        return forward(self, x)
    return wrapped


def test_prefill_orders_rows_by_adapter(setup):
    """A prefill of rows on interleaved adapters runs as one slice per adapter (not per row)."""
    spec, ads = setup
    fast = load_engine(spec, ads, dtype="fp32", kind="batched")
    runs = []
    real = fast.decoder.prefill

    def prefill(rows, cache):
        g = fast.lora.groups
        runs.append([a for a, *_ in g.runs] if g.runs is not None else g.adapters)
        return real(rows, cache)

    fast.decoder.prefill = prefill
    fast.prefix_cap = 0
    fast.generate([_req(p, adapter=[None, "a", "b"][i % 3], max_new_tokens=2) for i, p in enumerate(_prompts(6))])
    assert runs == [[0, 1]]  # base rows first (no LoRA), then a's, then b's
    # with the prefix cache on, a's second prompt waits for a's first one's KV; b's first goes with a's first
    fast.prefix_cap, runs[:] = 4, []
    p = _prompts(2)
    got = fast.generate([_req(p[0], adapter="a", max_new_tokens=2), _req(p[1], adapter="a", max_new_tokens=2),
                         _req(p[0], adapter="b", max_new_tokens=2)])
    assert runs == [[0, 1], [0]]
    assert [c.cached_tokens >= 16 for c in got] == [False, True, False]


def test_rows_join_and_leave_between_steps(setup):
    fast, _ = _pair(setup, max_batch=2)
    p = _prompts(4)
    alone = [fast.generate([_req(q, max_new_tokens=n)])[0].token_ids for q, n in zip(p, (30, 3, 3, 3))]
    rows = [fast.add_request(_req(q, max_new_tokens=n)) for q, n in zip(p, (30, 3, 3, 3))]
    finished_at, step = {}, 0
    while fast.has_unfinished():
        step += 1
        assert len(fast.running) <= 2
        for r in fast.step():
            finished_at[r.request.id] = step
    ids = [r.request.id for r in rows]
    # the three short requests went through the second row while the long one kept the first
    assert max(finished_at[i] for i in ids[1:]) < finished_at[ids[0]]
    assert [r.token_ids for r in rows] == alone


def test_shared_prefix_is_computed_once(setup):
    spec, ads = setup
    cached = load_engine(spec, ads, dtype="fp32", kind="batched")
    plain = load_engine(spec, ads, dtype="fp32", kind="batched")
    plain.prefix_cap = 0
    reqs = [_req(p, max_new_tokens=12) for p in _prompts()]
    got = cached.generate(reqs)
    assert got[0].cached_tokens == 0 and all(c.cached_tokens >= 16 for c in got[1:])
    assert [c.token_ids for c in got] == [c.token_ids for c in plain.generate(reqs)]
    # an adapter's rows never reuse the base's KV
    assert cached.generate([_req(_prompts()[1], adapter="a", max_new_tokens=4)])[0].cached_tokens == 0


def _few_shot_prompts(n):
    shots = " ".join(f"Example {j}: item {j} is a thing made of {j + 2} parts." for j in range(12))  # ~170 tokens
    return [[{"role": "system", "content": "You are a terse assistant. " + shots},
             {"role": "user", "content": f"Item {i}: describe it" + " in detail" * i}] for i in range(n)]


@pytest.mark.parametrize("adapters", [[None], [None, "a", "b"]])
def test_shared_prefix_is_attended_once_per_step(setup, monkeypatch, adapters):
    """Rows whose prompts share a long prefix (a few-shot block) decode attending it once per step for all of
    them (cascade): one group of every row, or one per adapter (each has its own prefix KV), generate's tokens."""
    import tunelab.infer.decoder as decoder

    groups, real = [], decoder.Decoder._cascade_attention

    def spy(self, q, keys, values, bias, scale, shared, layer):
        groups.append(len(shared.groups))
        return real(self, q, keys, values, bias, scale, shared, layer)

    monkeypatch.setattr(decoder.Decoder, "_cascade_attention", spy)
    fast, ref = _pair(setup)
    fast.cascade_min = 64  # these prompts share ~170 tokens
    reqs = [_req(p, adapter=adapters[i % len(adapters)], max_new_tokens=12)
            for i, p in enumerate(_few_shot_prompts(6))]
    got = fast.generate(reqs)
    assert all(c.cached_tokens >= 64 for c in got[len(adapters):])
    assert [c.token_ids for c in got] == [c.token_ids for c in ref.generate(reqs)]
    assert groups and max(groups) == len(adapters)


def test_shared_prefix_rows_joining_and_leaving(setup):
    """Cascade decoding keeps a packed copy of the rows' own positions; rows that finish at different steps and
    rows admitted while others decode (slots move, the capacity grows) must still get generate's tokens."""
    fast, ref = _pair(setup, max_batch=3)  # a finished row's slot is taken by a waiting one in the same step
    fast.cascade_min = 64
    prompts = _few_shot_prompts(6)
    reqs = [_req(p, max_new_tokens=3 + 7 * (i % 3), ignore_eos=True) for i, p in enumerate(prompts)]
    early = [fast.add_request(r) for r in reqs[:4]]
    for _ in range(4):
        fast.step()
    late = [fast.add_request(r) for r in reqs[4:]]
    while fast.has_unfinished():
        fast.step()
    assert [h.completion().token_ids for h in early + late] == [c.token_ids for c in ref.generate(reqs)]


def test_adapters_added_and_removed_at_run_time(setup):
    spec, ads = setup
    eng = load_engine(spec, {"a": ads["a"]}, dtype="fp32", kind="batched")
    before = eng.generate([_req(_prompts()[0], adapter="a", max_new_tokens=8)])[0].token_ids
    eng.add_adapter("b", ads["b"])
    assert eng.adapters == ["a", "b"]
    with pytest.raises(TunelabError, match="already loaded"):
        eng.add_adapter("b", ads["b"])
    row = eng.add_request(_req(_prompts()[0], adapter="a", max_new_tokens=8))
    with pytest.raises(TunelabError, match="in use"):
        eng.remove_adapter("a")
    while eng.has_unfinished():
        eng.step()
    eng.remove_adapter("a")
    assert eng.adapters == ["b"] and row.token_ids == before
    with pytest.raises(TunelabError, match="no adapter named 'a'"):
        eng.generate([_req(_prompts()[0], adapter="a")])
    again = load_engine(spec, {"b": ads["b"]}, dtype="fp32", kind="batched")
    req = [_req(_prompts()[2], adapter="b", max_new_tokens=8)]
    assert eng.generate(req)[0].token_ids == again.generate(req)[0].token_ids
    # the freed slot 0 is written in place (no rebuild of b's stacks); a's cached prefix is not reused by b's copy
    stacks = dict(eng.lora.stacks)
    eng.add_adapter("b2", ads["b"])
    assert eng.lora.index("b2") == 0 and all(eng.lora.stacks[k][0] is stacks[k][0] for k in stacks)
    got = eng.generate([_req(_prompts()[0], adapter="b2", max_new_tokens=8)])[0]
    want = again.generate([_req(_prompts()[0], adapter="b", max_new_tokens=8)])[0]
    assert got.cached_tokens == 0 and got.token_ids == want.token_ids
    eng.remove_adapter("b2")
    eng.add_adapter("a", ads["a"])
    assert eng.generate([_req(_prompts()[0], adapter="a", max_new_tokens=8)])[0].token_ids == before
    # a new slot: the resident adapters' stacks are copied as blocks, only the new slot is written
    writes, write = [], eng.lora._write
    eng.lora._write = lambda i: (writes.append(i), write(i))
    eng.add_adapter("b3", ads["b"])
    assert writes == [2] and eng.adapters == ["a", "b", "b3"]
    assert eng.generate([_req(_prompts()[0], adapter="a", max_new_tokens=8)])[0].token_ids == before
    assert eng.generate([_req(_prompts()[0], adapter="b3", max_new_tokens=8)])[0].token_ids == want.token_ids


def test_stop_strings_finish_reasons_and_streaming(setup):
    fast, ref = _pair(setup)
    full = fast.generate([_req(_prompts()[0], max_new_tokens=16)])[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 16
    stop = full.text[len(full.text) // 2:][:3]
    cut = fast.generate([_req(_prompts()[0], max_new_tokens=16, stop=[stop])])[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.find(stop)]
    assert cut.text == ref.generate([_req(_prompts()[0], max_new_tokens=16, stop=[stop])])[0].text
    pieces = list(fast.stream(_req(_prompts()[0], max_new_tokens=16)))
    assert len(pieces) > 1 and "".join(pieces) == full.text


def test_ignore_eos_generates_every_token(setup):
    fast, ref = _pair(setup)
    q = _prompts()[0]
    first = fast.generate([_req(q, max_new_tokens=8)])[0].token_ids[0]
    fast.eos = {first}  # the model's first pick ends the sequence ...
    ref.model.generation_config.eos_token_id = first
    for eng in (fast, ref):
        assert len(eng.generate([_req(q, max_new_tokens=8)])[0].token_ids) <= 1
        full = eng.generate([_req(q, max_new_tokens=8, ignore_eos=True)])[0]  # ... unless it is ignored
        assert len(full.token_ids) == 8 and full.finish_reason == "length" and full.token_ids[0] == first
    assert full.token_ids == fast.generate([_req(q, max_new_tokens=8, ignore_eos=True)])[0].token_ids


def test_sampling_is_repeatable_by_seed(setup):
    fast, _ = _pair(setup)
    q = _prompts()[0]
    a = fast.generate([_req(q, temperature=1.0, top_p=0.9, seed=7, max_new_tokens=12)])[0].token_ids
    b = fast.generate([_req(q, temperature=1.0, top_p=0.9, seed=7, max_new_tokens=12)])[0].token_ids
    c = fast.generate([_req(q, temperature=1.0, top_p=0.9, seed=8, max_new_tokens=12)])[0].token_ids
    greedy = fast.generate([_req(q, max_new_tokens=12)])[0].token_ids
    assert a == b and a != c and a != greedy


def test_what_the_batched_engine_cannot_run_goes_to_generate(setup, tmp_path, tokenizer):
    from tunelab.models import tiny_model

    spec, ads = setup
    if "qwen2" in spec:
        pytest.skip("the DoRA adapter below is made for the tiny Llama")
    dora = _save_adapter(lambda: tiny_model("llama", tokenizer=tokenizer)[0], tmp_path / "dora", 3, 4,
                         ["q_proj", "v_proj"], dora=True)
    assert type(load_engine(spec, {"d": dora}, dtype="fp32")).__name__ == "GenerateEngine"
    with pytest.raises(TunelabError, match="DoRA"):
        load_engine(spec, {"d": dora}, dtype="fp32", kind="batched")
    with pytest.raises(TunelabError, match="engine kind"):
        load_engine(spec, kind="turbo")


def test_batched_matches_generate_on_quantized_weights(setup):
    """bitsandbytes NF4 / int8 linear layers under the batched engine's own decoder and its LoRA layers.
    NF4 dequantizes the weight and runs a float matmul, so batches match token for token. LLM.int8() picks
    its fp16 outlier columns over all the rows of a forward, so its outputs depend on what shares the batch
    (transformers' own `generate` at batch 5 differs from batch 1 too): there the engine runs one request at
    a time without prefix reuse, as generate at batch 1 does."""
    spec, ads = setup
    reqs = [_req(p, adapter=[None, "a", "b"][i % 3], max_new_tokens=16) for i, p in enumerate(_prompts(6))]
    fast, ref = _pair(setup, load_in="4bit")
    assert type(fast.decoder.layers[0].self_attn.q_proj.base).__name__ == "Linear4bit"
    assert [c.token_ids for c in fast.generate(reqs)] == [c.token_ids for c in ref.generate(reqs)]
    fast, ref = _pair(setup, load_in="8bit")
    assert type(fast.decoder.layers[0].mlp.down_proj.base).__name__ == "Linear8bitLt"
    fast.prefix_cap = 0
    assert [fast.generate([q])[0].token_ids for q in reqs] == [c.token_ids for c in ref.generate(reqs)]


def test_device_choice():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(TunelabError, match="no CUDA device"):
            resolve_device("cuda")
    with pytest.raises(TunelabError, match="use auto, cpu"):
        resolve_device("tpu")


@pytest.mark.slow
def test_bundled_model_batched_matches_generate(tmp_path):
    """The bundled model (fp32), orders-json prompts, two random LoRA adapters and the task's schema."""
    from tunelab.models import load_model
    from tunelab.tasks import load_task

    def make():
        return load_model("smollm2-135m-instruct", dtype="fp32")[0]

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ads = {}
    for i in range(2):
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(i)
        pm = get_peft_model(make(), LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False))
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.data.mul_(0.02)  # a nudge, not noise: the answers stay JSON-like
        pm.save_pretrained(tmp_path / f"a{i}")
        ads[f"a{i}"] = str(tmp_path / f"a{i}")
    task = load_task("orders-json")
    prompts = [task.messages(e) for e in task.examples("test", limit=2)]
    fast = load_engine("smollm2-135m-instruct", ads, dtype="fp32", kind="batched")
    ref = load_engine("smollm2-135m-instruct", ads, dtype="fp32", kind="generate", batch_size=1)
    grammar = fast.compile_grammar(schema=task.schema())
    reqs = [_req(p, adapter=a, grammar=g, max_new_tokens=24) for a in (None, "a0", "a1")
            for g in (None, grammar) for p in prompts]
    got, want = fast.generate(reqs), ref.generate(reqs)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
