"""The trainer's CPU fast paths agree with the plain computations they replace.

Per-example packed attention vs causal SDPA, the fused lm_head + loss vs logits then loss, the cheaper
LoRA dropout vs nn.Dropout's contract, and the trainer's head hook vs the model's own logits.
"""

import pytest
import torch
import torch.nn.functional as F

from tunelab.fast import attention
from tunelab.fast.dropout import FastDropout, keep_mask, use_fast_dropout
from tunelab.models.losses import linear_weighted_loss, weighted_loss


@pytest.mark.parametrize("heads,kv", [(4, 4), (6, 2)])
def test_example_attention_matches_causal_sdpa(heads, kv):
    torch.manual_seed(0)
    q = torch.randn(heads, 13, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(kv, 13, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(kv, 13, 8, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda q, k, v: attention._ExampleAttention.apply(q, k, v, 0.3), (q, k, v))
    out = attention._ExampleAttention.apply(q, k, v, 0.3)
    ref = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=0.3,
                                         enable_gqa=heads != kv)[0]
    torch.testing.assert_close(out, ref)


def test_packed_attention_runs_per_example_and_falls_back():
    torch.manual_seed(0)
    module = torch.nn.Module()
    q, k, v = torch.randn(1, 4, 10, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    cu = torch.tensor([0, 3, 10])
    out, _ = attention.packed_attention(module, q, k, v, None, scaling=0.5, cu_seq_lens_q=cu)  # (1, N, H, D)
    for s, e in [(0, 3), (3, 10)]:
        ref = F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True,
                                             scale=0.5, enable_gqa=True)
        torch.testing.assert_close(out[:, s:e], ref.transpose(1, 2), atol=1e-5, rtol=1e-5)
    module.num_key_value_groups, module.is_causal = 2, True  # without offsets: transformers' SDPA, one causal row
    whole, _ = attention.packed_attention(module, q, k, v, None, scaling=0.5)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5, enable_gqa=True)
    torch.testing.assert_close(whole, ref.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_flat_batches_reach_the_packed_attention(tokenizer, monkeypatch):
    from tunelab.data import Batches, model_inputs, tokenize_dataset
    from tunelab.models import tiny_model

    seen = []
    original = attention._ExampleAttention.apply
    monkeypatch.setattr(attention._ExampleAttention, "apply", lambda *a: seen.append(a[0].shape[1]) or original(*a))
    model, _ = tiny_model("llama", tokenizer, seed=0)
    attention.use_packed_attention(model)
    rows = [[{"role": "user", "content": "hi " * n}, {"role": "assistant", "content": "ok"}] for n in (3, 9)]
    examples, _ = tokenize_dataset(tokenizer, rows, 0.1, max_length=64)
    batch = next(iter(Batches(examples, 2, 64, 2, packing=True, flat=True)))
    with torch.no_grad():
        model(**model_inputs(batch))
    lengths = sorted({len(e) for e in examples})
    assert sorted(set(seen)) == lengths  # one call per example and layer, each of its own length
    assert len(seen) == 2 * model.config.num_hidden_layers


@pytest.mark.parametrize("rows", [16, 3])  # 3: the fp32 softmax runs in several blocks of each chunk
@pytest.mark.parametrize("autocast", [False, True])
def test_linear_weighted_loss_matches_logits_then_loss(autocast, rows, monkeypatch):
    from tunelab.models.losses import _LinearWeightedNLL

    monkeypatch.setattr(_LinearWeightedNLL, "ROWS", rows)
    torch.manual_seed(0)
    h = torch.randn(2, 9, 8, requires_grad=True)
    W = torch.randn(50, 8, requires_grad=True)
    ids = torch.randint(0, 50, (2, 9))
    w = torch.rand(2, 9) * (torch.rand(2, 9) > 0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        fused, wsum = linear_weighted_loss(h, W, ids, w, chunk_tokens=8)
    gh, gW = torch.autograd.grad(fused * 3, (h, W))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ref, ref_wsum = weighted_loss(h @ W.T, ids, w)
    rh, rW = torch.autograd.grad(ref * 3, (h, W))
    tol = {"atol": 1e-2, "rtol": 1e-2} if autocast else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(fused, ref, **tol)
    torch.testing.assert_close(gh, rh, **tol)
    torch.testing.assert_close(gW, rW, **tol)
    assert wsum == ref_wsum
    with torch.no_grad():  # evaluation: no gradient work, same loss
        torch.testing.assert_close(linear_weighted_loss(h, W, ids, w)[0], fused.detach(), **tol)
    zero, _ = linear_weighted_loss(h, W, ids, torch.zeros(2, 9))
    assert zero.item() == 0.0


def test_fused_head_gives_the_models_loss(tokenizer):
    from tunelab.data import collate, tokenize_dataset
    from tunelab.fast import FusedHead
    from tunelab.models import tiny_model
    from tunelab.train.loop import batch_loss as _loss

    model, _ = tiny_model("qwen2", tokenizer, seed=0)
    head = FusedHead.attach(model)
    assert head is not None
    rows = [[{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi " * k}] for k in (2, 5)]
    examples, _ = tokenize_dataset(tokenizer, rows, 0.1, max_length=64)
    batch = collate(examples, [[0, 1]], 2, packed=True)
    s_fused, w_fused = _loss(model, batch, 0, head)
    s_ref, w_ref = _loss(model, batch, 0, None)
    torch.testing.assert_close(s_fused, s_ref, atol=1e-5, rtol=1e-5)
    s_fused.backward()
    g_fused = model.model.layers[0].mlp.up_proj.weight.grad.clone()
    model.zero_grad()
    s_ref.backward()
    torch.testing.assert_close(g_fused, model.model.layers[0].mlp.up_proj.weight.grad, atol=1e-5, rtol=1e-4)


def test_keep_mask_rate_and_fast_dropout_contract():
    g = torch.Generator().manual_seed(0)
    keep = keep_mask(torch.Size([500, 400]), 0.05, generator=g)
    assert keep.dtype == torch.bool and keep.shape == (500, 400)
    assert abs((~keep).float().mean().item() - 0.05) < 0.003  # 200k draws: 5 sigma is 0.0024
    assert abs((~keep[:, 0::4]).float().mean().item() - 0.05) < 0.005  # every 16-bit lane is uniform
    assert abs((~keep[:, 3::4]).float().mean().item() - 0.05) < 0.005
    x = torch.randn(64, 32, requires_grad=True)
    d = FastDropout(0.25)
    y = d(x)
    y.sum().backward()
    dropped = y == 0
    assert 0.15 < dropped.float().mean().item() < 0.35
    torch.testing.assert_close(y[~dropped], x[~dropped] / 0.75)
    assert torch.equal(x.grad == 0, dropped)  # backward uses the forward's mask
    d.eval()
    assert torch.equal(d(x), x)


def test_use_fast_dropout_swaps_peft_lora_dropout(tokenizer):
    from tunelab.config.recipe import LoraConfig
    from tunelab.fast import enable
    from tunelab.models import tiny_model
    from tunelab.models.methods import apply_method

    model, _ = tiny_model("llama", tokenizer, seed=0)
    model = apply_method(model, "lora", LoraConfig(r=4, alpha=8, dropout=0.1, targets="attention"))
    assert not any(type(m) is FastDropout for m in model.modules())  # apply_method is plain PEFT
    enable(model, on=True, packing=False)
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(type(m) is FastDropout and m.p == 0.1 for m in drops)
    assert use_fast_dropout(model) == 0  # already swapped


def test_keep_freed_memory_on_linux():
    import sys

    from tunelab.fast.cpu import keep_freed_memory

    assert keep_freed_memory() is sys.platform.startswith("linux")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_shared_prefix_batch_gives_the_same_loss_and_gradients(tokenizer, arch):
    """A flat batch holding the common system prompt once: same summed loss and gradients as padded examples."""
    from tunelab.data import Batches, collate, model_inputs, tokenize_dataset
    from tunelab.models import tiny_model

    system = {"role": "system", "content": "Extract the order as JSON with customer, items and notes. " * 3}
    rows = [[system, {"role": "user", "content": "order " + "apple " * n},
             {"role": "assistant", "content": f'{{"n": {n}}}'}] for n in (1, 4, 2, 7)]
    examples, _ = tokenize_dataset(tokenizer, rows, 0.3, max_length=256)

    def run(batch):
        model, _ = tiny_model(arch, tokenizer, seed=3)
        attention.use_packed_attention(model)
        logits = model(**model_inputs(batch)).logits
        loss, wsum = weighted_loss(logits, batch["input_ids"], batch["weights"], sources=batch.get("sources"))
        (loss * wsum).backward()
        return (loss * wsum).detach(), model.model.layers[0].self_attn.q_proj.weight.grad

    shared = collate(examples, [[0, 1], [2, 3]], tokenizer.pad_token_id, packed=True, flat=True, share_prefix=16)
    p = int(shared["shared_prefix"])
    assert p >= 30 and shared["cu_seq_lens"][1] == p
    assert shared["input_ids"].shape[1] == sum(len(e) for e in examples) - 3 * p
    padded = next(iter(Batches(examples, 4, 256, tokenizer.pad_token_id, packing=False)))
    loss_shared, grad_shared = run(shared)
    loss_padded, grad_padded = run(padded)
    torch.testing.assert_close(loss_shared, loss_padded, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(grad_shared, grad_padded, atol=1e-5, rtol=1e-4)
    # examples with nothing in common are not shared
    alone = collate(examples[:1] + fake_distinct(), [[0, 1]], 0, packed=True, flat=True, share_prefix=16)
    assert "shared_prefix" not in alone


def fake_distinct():
    from tunelab.data import Example

    return [Example([7, 8, 9, 10], [0.0, 1.0, 1.0, 1.0])]


def test_example_attention_after_a_prefix_matches_sdpa():
    torch.manual_seed(1)
    q = torch.randn(6, 5, 8, dtype=torch.float64, requires_grad=True)  # the last 5 of 9 positions
    k = torch.randn(2, 9, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 9, 8, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda q, k, v: attention._ExampleAttention.apply(q, k, v, 0.3), (q, k, v))
    mask = torch.ones(5, 9, dtype=torch.bool).tril(4)  # query i sees keys up to 4 + i
    ref = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, scale=0.3, enable_gqa=True)[0]
    torch.testing.assert_close(attention._ExampleAttention.apply(q, k, v, 0.3), ref)
    # the prefix passed apart (as packed_attention does): the same values and gradients, and no joined copy kept
    kp, vp, ko, vo = (t.detach().clone().requires_grad_() for t in (k[:, :4], v[:, :4], k[:, 4:], v[:, 4:]))
    torch.autograd.gradcheck(lambda *t: attention._ExampleAttention.apply(*t[:3], 0.3, *t[3:]), (q, ko, vo, kp, vp))
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = attention._ExampleAttention.apply(q, ko, vo, 0.3, kp, vp)
    inputs = {t.untyped_storage().data_ptr() for t in (q, ko, vo, kp, vp)}
    assert len(kept) == 5 and {t.untyped_storage().data_ptr() for t in kept} == inputs  # the inputs, no copies
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad((out * ref.detach()).sum(), (q, ko, vo, kp, vp))
    ref_grads = torch.autograd.grad((ref * ref.detach()).sum(), (q, k, v))
    torch.testing.assert_close(grads[0], ref_grads[0])
    torch.testing.assert_close(torch.cat([grads[3], grads[1]], 1), ref_grads[1])
    torch.testing.assert_close(torch.cat([grads[4], grads[2]], 1), ref_grads[2])


def _lora_pair(tokenizer, dropout: float):
    """Two identical tiny LoRA models (B randomised so the adapter matters): PEFT's forward, and fused."""
    import copy

    from peft.tuners.lora import Linear as LoraLinear

    from tunelab.config.recipe import LoraConfig
    from tunelab.fast import enable
    from tunelab.fast.lora import use_fused_lora
    from tunelab.models import tiny_model
    from tunelab.models.methods import apply_method

    model, _ = tiny_model("llama", tokenizer, seed=0)
    model = apply_method(model, "lora", LoraConfig(r=4, alpha=8, dropout=dropout, targets="attention+mlp"))
    enable(model, on=True, packing=False)
    torch.manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    fused = copy.deepcopy(model)
    assert use_fused_lora(fused) == 0  # enable already fused it
    for m in model.modules():  # the reference takes PEFT's and transformers' own forwards
        if type(m).__name__ == "FusedLoraLinear":
            m.__class__ = LoraLinear
        elif type(m).__name__ == "FusedLlamaMLP":
            m.__class__ = type(m).__mro__[1]
    assert use_fused_lora(copy.deepcopy(model)) == 7 * model.config.num_hidden_layers
    return model, fused


def _loss_and_grads(model, ids, autocast: bool):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids).logits.float()
    loss = logits.logsumexp(-1).mean() - logits[..., 0].mean()
    loss.backward()
    return logits, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_lora_matches_peft_forward_and_gradients(tokenizer, autocast):
    model, fused = _lora_pair(tokenizer, dropout=0.0)
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    ref_logits, ref = _loss_and_grads(model, ids, autocast)
    logits, got = _loss_and_grads(fused, ids, autocast)
    tol = dict(atol=3e-2, rtol=3e-2) if autocast else dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits, ref_logits, **tol)
    assert got.keys() == ref.keys() and len(got) == 14 * model.config.num_hidden_layers
    for n in ref:
        assert got[n].dtype == ref[n].dtype == torch.float32, n
        torch.testing.assert_close(got[n], ref[n], **tol, msg=n)
    with torch.no_grad():  # generation and mixed-adapter batches take PEFT's own forward
        torch.testing.assert_close(fused(input_ids=ids).logits, model(input_ids=ids).logits)


def test_fused_lora_dropout_is_inverted_dropout_with_one_mask():
    from tunelab.fast.lora import _LoraLinear

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w, bias = torch.randn(12, 16, dtype=torch.float64, generator=g), torch.randn(12, dtype=torch.float64)
    a = torch.randn(4, 16, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(12, 4, dtype=torch.float64, generator=g, requires_grad=True)
    torch.manual_seed(7)
    y = _LoraLinear.apply(x, w, bias, a, b, 2.0, 0.25)
    y.square().sum().backward()
    got = [t.grad.clone() for t in (x, a, b)]
    torch.manual_seed(7)
    keep = keep_mask(torch.Size([15, 16]), 0.25).view(3, 5, 16)  # the mask the fused forward drew
    assert 0 < (~keep).sum() < keep.numel()
    for t in (x, a, b):
        t.grad = None
    ref = F.linear(x, w, bias) + F.linear(F.linear(torch.where(keep, x / 0.75, 0), a), b) * 2.0
    torch.testing.assert_close(y, ref)
    ref.square().sum().backward()
    for got_t, t in zip(got, (x, a, b)):
        torch.testing.assert_close(got_t, t.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rmsnorm_matches_transformers(dtype):
    import copy

    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from tunelab.fast.norm import use_fused_norm

    ref = LlamaRMSNorm(48, eps=1e-5).to(dtype)
    ref.weight.data.normal_(1, 0.2, generator=torch.Generator().manual_seed(0))
    holder = torch.nn.Sequential(copy.deepcopy(ref))
    assert use_fused_norm(holder) == 1 and use_fused_norm(holder) == 0
    fused = holder[0]
    assert isinstance(fused, LlamaRMSNorm) and type(fused) is not LlamaRMSNorm
    x = (torch.randn(2, 7, 48, generator=torch.Generator().manual_seed(1)) * 3).to(dtype).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y, y2 = ref(x), fused(x2)
    assert torch.equal(y, y2)  # the same arithmetic forward
    g = torch.randn(2, 7, 48, generator=torch.Generator().manual_seed(2)).to(dtype)
    y.backward(g)
    y2.backward(g)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x2.grad, x.grad, **tol)
    torch.testing.assert_close(fused.weight.grad, ref.weight.grad, **tol)
    with torch.no_grad():
        assert torch.equal(fused(x), ref(x))


def test_fused_rmsnorm_gradcheck():
    from tunelab.fast.norm import _RMSNorm

    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _RMSNorm.apply(a, b, 1e-6), (x, w))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_keep_mask_as_is_keep_mask_in_the_input_dtype(dtype):
    x = torch.empty(300, 70, dtype=dtype)
    keep = keep_mask(x.shape, 0.1, generator=torch.Generator().manual_seed(3))
    from tunelab.fast.dropout import keep_mask_as

    m = keep_mask_as(x, 0.1, generator=torch.Generator().manual_seed(3))
    assert m.dtype == dtype and torch.equal(m, keep.to(dtype))
    assert 0.07 < 1 - m.float().mean().item() < 0.13


def test_fused_swiglu_lora_is_lora_of_silu_times_up_with_the_same_mask():
    from tunelab.fast.lora import _LoraLinear
    from tunelab.fast.mlp import _SwiGLU, _SwiGLULora

    g = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(3, 5, 24, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    w, bias = torch.randn(8, 24, dtype=torch.float64, generator=g), torch.randn(8, dtype=torch.float64)
    a = torch.randn(4, 24, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(8, 4, dtype=torch.float64, generator=g, requires_grad=True)
    bias.requires_grad_()
    leaves = (gate, up, a, b, bias)
    torch.manual_seed(7)
    y = _SwiGLULora.apply(gate, up, w, bias, a, b, 2.0, 0.25)
    got = torch.autograd.grad(y.square().sum(), leaves)
    torch.manual_seed(7)  # the same dropout mask, drawn by the unfused LoRA
    ref = _LoraLinear.apply(F.silu(gate) * up, w, bias, a, b, 2.0, 0.25)
    torch.testing.assert_close(y, ref)
    for got_t, ref_t in zip(got, torch.autograd.grad(ref.square().sum(), leaves)):
        torch.testing.assert_close(got_t, ref_t)
    assert torch.autograd.gradcheck(_SwiGLU.apply, (gate, up))
    assert torch.autograd.gradcheck(lambda *t: _SwiGLULora.apply(*t[:2], w, t[2], t[3], t[4], 2.0, 0.0),
                                    (gate, up, bias, a, b))


def test_fused_lora_mlp_keeps_two_wide_activations_and_bit_packed_masks(tokenizer):
    """What a LoRA MLP block keeps for backward: gate and up (T, inter) in bf16, masks at 1 bit per element."""
    from tunelab.config.recipe import LoraConfig
    from tunelab.fast import enable
    from tunelab.models import tiny_model
    from tunelab.models.methods import apply_method

    model, _ = tiny_model("llama", tokenizer, seed=0)
    model = apply_method(model, "lora", LoraConfig(r=4, alpha=8, dropout=0.1, targets="attention+mlp"))
    enable(model, on=True, packing=False)
    mlp = model.base_model.model.model.layers[0].mlp
    assert type(mlp).__name__ == "FusedLlamaMLP"
    d, inter = model.config.hidden_size, model.config.intermediate_size
    x = torch.randn(1, 40, d, dtype=torch.bfloat16, requires_grad=True)  # as the bf16 norm hands it over
    kept: dict[int, torch.Tensor] = {}

    def pack(t):
        kept.setdefault(t.untyped_storage().data_ptr(), t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        y = mlp(x)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    # per-token tensors: (40, n) activations and 1-D packed masks (not the weights' bf16 copies under autocast)
    acts = [t for ptr, t in kept.items() if ptr not in params and (t.dim() == 1 or t.shape[:-1].numel() == 40)]
    wide = [t for t in acts if t.shape[-1] == inter and t.dtype == torch.bfloat16]
    assert len(wide) == 2  # gate and up; not silu(gate), not the product, not a dropped-out copy
    masks = [t for t in acts if t.dtype == torch.uint8]
    assert sorted(m.numel() for m in masks) == [40 * d // 8, 40 * d // 8, 40 * inter // 8]
    # gate, up and x in bf16, the three masks, three (40, r) low-rank activations: nothing else
    assert sum(t.numel() * t.element_size() for t in acts) == 40 * (2 * inter * 2 + d * 2 + (2 * d + inter) // 8
                                                                    + 3 * 4 * 2)
    y.sum().backward()
    assert x.grad is not None and all(torch.isfinite(p.grad).all() for p in mlp.parameters() if p.requires_grad)


def test_random_words_follow_torchs_seed_and_every_bit_is_fair():
    from tunelab.fast.dropout import random_words

    torch.manual_seed(5)
    a = random_words(4096, "cpu")
    torch.manual_seed(5)
    assert torch.equal(a, random_words(4096, "cpu"))  # torch's RNG state decides the words (resume, seeds)
    assert not torch.equal(a, random_words(4096, "cpu"))  # and advances
    assert torch.equal(a, random_words(4096, "cpu", torch.Generator().manual_seed(5)))  # a generator's own state
    assert not torch.equal(a, random_words(4096, "cpu", torch.Generator().manual_seed(6)))
    bits = a.view(-1, 1).bitwise_right_shift(torch.arange(64)).bitwise_and(1).float().mean(0)  # (64,)
    assert bits.min() > 0.47 and bits.max() < 0.53  # 4096 draws a bit: 5 sigma is 0.039
