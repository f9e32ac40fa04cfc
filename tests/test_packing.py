"""Packing: first-fit-decreasing plans, collation, no cross-example leakage, and the weighted loss."""

import random

import pytest
import torch
import torch.nn.functional as F

from tunelab.data import (
    Batches,
    Example,
    collate,
    first_fit_decreasing,
    model_inputs,
    tokenize_dataset,
)
from tunelab.errors import TunelabError
from tunelab.models.losses import weighted_loss


def conversations(n=10, seed=0):
    rng = random.Random(seed)
    words = "apple pear ship Oslo order count total price blue red".split()
    rows = []
    for i in range(n):
        rows.append([{"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(2, 30)))},
                     {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 20)))}])
        if i % 3 == 0:  # some two-turn conversations
            rows[-1] += [{"role": "user", "content": "and?"}, {"role": "assistant", "content": words[i % 10]}]
    return rows


def naive_first_fit_decreasing(lengths, capacity):
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        b = next((b for b, r in enumerate(room) if r >= lengths[i]), None)
        if b is None:
            bins.append([])
            room.append(capacity)
            b = len(bins) - 1
        bins[b].append(i)
        room[b] -= lengths[i]
    return bins


def test_first_fit_decreasing_matches_naive():
    assert first_fit_decreasing([5, 3, 7, 2, 4], 10) == [[2, 1], [0, 4], [3]]
    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.randint(1, 64) for _ in range(rng.randint(1, 200))]
        assert first_fit_decreasing(lengths, 64) == naive_first_fit_decreasing(lengths, 64)
    assert first_fit_decreasing([], 8) == []
    with pytest.raises(TunelabError, match="max_length=8"):
        first_fit_decreasing([3, 9], 8)


def fake(lengths):
    return [Example(list(range(1, n + 1)), [1.0] * n, index=i) for i, n in enumerate(lengths)]


def test_collate_packed_and_padded():
    examples = fake([3, 2, 4])
    packed = collate(examples, [[0, 1], [2]], pad_id=0, packed=True)
    assert "attention_mask" not in packed
    assert packed["input_ids"].tolist() == [[1, 2, 3, 1, 2], [1, 2, 3, 4, 0]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert packed["weights"].tolist() == [[0, 1, 1, 0, 1], [0, 1, 1, 1, 0]]
    padded = collate(examples, [[0], [2]], pad_id=0, packed=False)
    assert padded["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert padded["weights"].tolist() == [[0, 1, 1, 0], [0, 1, 1, 1]]
    assert model_inputs(packed)["use_cache"] is False and "weights" not in model_inputs(packed)


@pytest.mark.parametrize("packing", [True, False])
def test_batches_plan(packing):
    rng = random.Random(1)
    examples = fake([rng.randint(2, 50) for _ in range(100)])
    batches = Batches(examples, batch_size=4, max_length=64, pad_id=0, packing=packing, seed=3)
    again = Batches(examples, batch_size=4, max_length=64, pad_id=0, packing=packing, seed=3)
    other = Batches(examples, batch_size=4, max_length=64, pad_id=0, packing=packing, seed=4)
    assert batches.plan == again.plan and batches.plan != other.plan
    used = sorted(i for rows in batches.plan for row in rows for i in row)
    assert used == list(range(100))
    assert all(len(rows) <= 4 for rows in batches.plan)
    out = list(batches)
    assert len(out) == len(batches)
    assert all(b["input_ids"].shape[1] <= 64 for b in out)
    slots = sum(b["input_ids"].numel() for b in out)
    assert batches.slots == slots and batches.efficiency == pytest.approx(batches.real_tokens / slots)
    if packing:
        assert batches.efficiency > 0.9
        assert len(batches) < len(Batches(examples, 4, 64, 0, packing=False))
    capped = Batches(examples, batch_size=8, max_length=64, pad_id=0, packing=packing, max_tokens=128)
    assert all(b["input_ids"].numel() <= 128 or b["input_ids"].shape[0] == 1 for b in capped)


def naive_loss(logits, input_ids, weights):
    nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), input_ids[:, 1:].flatten(), reduction="none")
    w = weights[:, 1:].flatten()
    return (nll * w).sum() / w.sum()


def test_weighted_loss_matches_naive_and_chunks_agree():
    torch.manual_seed(0)
    logits = torch.randn(3, 17, 50, requires_grad=True)
    input_ids = torch.randint(0, 50, (3, 17))
    weights = torch.rand(3, 17) * (torch.rand(3, 17) > 0.3)
    ref = naive_loss(logits, input_ids, weights)
    (g_ref,) = torch.autograd.grad(ref, logits)
    for chunk in (1, 7, 1024):
        loss, wsum = weighted_loss(logits, input_ids, weights, chunk_tokens=chunk)
        (g,) = torch.autograd.grad(loss, logits)
        assert torch.allclose(loss, ref, rtol=1e-5) and torch.allclose(g, g_ref, atol=1e-6)
        assert wsum == pytest.approx(weights[:, 1:].sum().item(), rel=1e-6)
    zero, wsum = weighted_loss(logits, input_ids, torch.zeros(3, 17))
    zero.backward()
    assert zero.item() == 0.0 and wsum.item() == 0.0
    bf16 = logits.detach().bfloat16()
    assert weighted_loss(bf16, input_ids, weights)[0].item() == pytest.approx(
        naive_loss(bf16, input_ids, weights).item(), rel=1e-5)


def summed_loss_and_logits(model, examples, packing, flat=False):
    """Weighted loss summed over all tokens, and each example's logits (by example index)."""
    total, per_example = 0.0, {}
    batches = Batches(examples, batch_size=2 if packing else 3, max_length=160, pad_id=2, packing=packing,
                      flat=flat)
    with torch.no_grad():
        for rows, batch in zip(batches.plan, batches):
            logits = model(**model_inputs(batch)).logits  # (B, T, V), flat: (1, N, V)
            loss, wsum = weighted_loss(logits, batch["input_ids"], batch["weights"])
            total += (loss * wsum).item()
            pos = 0
            for b, row in enumerate(rows):
                pos = pos if flat else 0
                for i in row:
                    per_example[i] = logits[0 if flat else b, pos:pos + len(examples[i])]
                    pos += len(examples[i])
    return total, per_example, batches


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("qwen2", "sdpa"), ("llama", "eager")])
@pytest.mark.parametrize("plw", [0.1, 0.0])
def test_packed_equals_unpacked(tokenizer, arch, attn, plw):
    from tunelab.models import tiny_model

    model, _ = tiny_model(arch, tokenizer, seed=1)
    model.set_attn_implementation(attn)
    examples, _ = tokenize_dataset(tokenizer, conversations(), plw, max_length=160)
    packed, packed_logits, plan = summed_loss_and_logits(model, examples, packing=True)
    unpacked, unpacked_logits, _ = summed_loss_and_logits(model, examples, packing=False)
    assert any(len(row) > 1 for rows in plan.plan for row in rows)  # something really was packed
    assert packed == pytest.approx(unpacked, rel=1e-4)
    for i in range(len(examples)):
        torch.testing.assert_close(packed_logits[i], unpacked_logits[i], atol=1e-4, rtol=1e-4)


def test_collate_flat():
    examples = fake([3, 2, 4])
    flat = collate(examples, [[0, 1], [2]], pad_id=0, packed=True, flat=True)
    assert flat["input_ids"].tolist() == [[1, 2, 3, 1, 2, 1, 2, 3, 4]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert flat["weights"].tolist() == [[0, 1, 1, 0, 1, 0, 1, 1, 1]]
    assert flat["cu_seq_lens"].tolist() == [0, 3, 5, 9]
    kwargs = model_inputs(flat)
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 3, 5, 9] and kwargs["max_length_q"] == 4
    with pytest.raises(ValueError):
        collate(examples, [[0]], pad_id=0, packed=False, flat=True)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["tunelab_packed", "sdpa"])
def test_flat_packed_equals_unpacked(tokenizer, arch, attn):
    """Padding-free (1, N) batches give every example the logits it has alone, with tunelab's per-example
    attention and with transformers' own SDPA (which masks from the restarting position ids)."""
    from tunelab.fast.attention import PACKED, use_packed_attention
    from tunelab.models import tiny_model

    model, _ = tiny_model(arch, tokenizer, seed=1)
    examples, _ = tokenize_dataset(tokenizer, conversations(), 0.1, max_length=160)
    model.set_attn_implementation("sdpa")
    unpacked, unpacked_logits, _ = summed_loss_and_logits(model, examples, packing=False)
    if attn == PACKED:
        use_packed_attention(model)
    flat, flat_logits, plan = summed_loss_and_logits(model, examples, packing=True, flat=True)
    assert sum(len(row) for row in plan.plan[0]) > 1
    assert flat == pytest.approx(unpacked, rel=1e-4)
    for i in range(len(examples)):
        torch.testing.assert_close(flat_logits[i], unpacked_logits[i], atol=1e-4, rtol=1e-4)
