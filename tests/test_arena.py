"""The activation arena: backward reads the same values from the block as from the tensors it copied."""

import pytest
import torch

from tunelab.fast.arena import ALIGN, ActivationArena


def _lora_model(tokenizer):
    from tunelab.config.recipe import LoraConfig
    from tunelab.fast import enable
    from tunelab.models import tiny_model
    from tunelab.models.methods import apply_method

    model, _ = tiny_model("llama", tokenizer, seed=0)
    model = apply_method(model, "lora", LoraConfig(r=4, alpha=8, dropout=0.0, targets="attention+mlp"))
    enable(model, on=True, packing=False)  # the fused modules the arena runs with in training
    torch.manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    return model.train()


def _grads(model, batches, arena=None, autocast=False):
    model.zero_grad()
    for ids in batches:
        ctx = arena.saving() if arena else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
        with ctx, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=ids).logits.float()
        (logits.logsumexp(-1).mean() - logits[..., 0].mean()).backward()
        if arena:
            arena.release()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("autocast", [False, True])
def test_arena_gives_the_same_gradients_and_grows_to_the_largest_micro_batch(tokenizer, autocast):
    model = _lora_model(tokenizer)
    g = torch.Generator().manual_seed(0)
    # the first fills nothing (no block yet), the second fits, the third is longer: part of it overflows
    batches = [torch.randint(0, 1000, (1, n), generator=g) for n in (20, 12, 30)]
    ref = _grads(model, batches, autocast=autocast)
    arena = ActivationArena(model)
    got = _grads(model, batches, arena, autocast)
    for n in ref:
        assert torch.equal(got[n], ref[n]), n  # the same bytes, read from elsewhere
    assert arena.capacity > 0 and arena.need == 0 and not arena.seen


def test_arena_copies_each_storage_once_and_never_a_parameter(tokenizer):
    model = _lora_model(tokenizer)
    arena = ActivationArena(model)
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    _grads(model, [ids], arena)  # sizes the block
    storages, alive = {}, []  # kept alive, so no address is reused by another storage during the forward
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def spy(t):
        alive.append(t.untyped_storage())
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return arena._pack(t)

    with torch.autograd.graph.saved_tensors_hooks(spy, lambda t: t):
        logits = model(input_ids=ids).logits
    copied = {p: n for p, n in storages.items() if p not in params and p}
    assert arena.need == sum(-(-n // ALIGN) * ALIGN for n in copied.values())  # one copy per storage
    assert arena.need <= arena.capacity and all(fits for _, _, fits in arena.seen.values())
    in_block = [p for p in copied if arena.seen[p][2]]
    assert len(in_block) == len(copied) > 10
    logits.sum().backward()
    arena.release()


def test_pack_copies_a_storage_once_keeps_views_exact_and_lets_the_original_go():
    import gc
    import weakref

    layer = torch.nn.Linear(8, 8)
    arena = ActivationArena(layer)
    arena._pack(torch.zeros(1024))
    arena.release()  # a block of 4 KiB and a bit
    x = torch.randn(64, 8)
    a, b = x[3:10, 2:5], x.t()  # views with an offset and with strides
    pa, pb = arena._pack(a), arena._pack(b)
    assert torch.equal(pa, a) and torch.equal(pb, b) and pa.stride() == a.stride()
    assert pa.untyped_storage().data_ptr() == pb.untyped_storage().data_ptr() == arena.block.data_ptr()
    assert arena.need == x.numel() * 4  # one copy of x's storage (2048 bytes, a multiple of ALIGN)
    assert arena._pack(layer.weight) is layer.weight
    gone = weakref.ref(x.untyped_storage())
    del x, a, b
    gc.collect()
    assert gone() is None  # the arena keeps the copy, not the original
    assert arena._pack(torch.ones(4096)).data_ptr() != arena.block.data_ptr()  # too big for the block: left as is


def _vm_flags(ptr: int) -> list[str]:
    """The VmFlags of the mapping holding address `ptr` (Linux /proc/self/smaps)."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= ptr < hi
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    return []


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="madvise is Linux's")
def test_no_huge_pages_marks_the_blocks_pages_and_the_arena_uses_it(tokenizer):
    import mmap

    from tunelab.fast.cpu import no_huge_pages

    region = mmap.mmap(-1, 8 << 20)  # a fresh mapping: heap memory may carry an earlier test's advice
    t = torch.frombuffer(region, dtype=torch.uint8)
    mid = t.data_ptr() + (4 << 20)
    assert "nh" not in _vm_flags(mid)
    assert no_huge_pages(t) and "nh" in _vm_flags(mid)
    del t
    region.close()
    assert not no_huge_pages(torch.empty(16, dtype=torch.uint8)[1:2])  # no whole page inside
    model = _lora_model(tokenizer)
    arena = ActivationArena(model)
    _grads(model, [torch.randint(0, 1000, (1, 64))], arena)
    assert arena.capacity > 2 * 4096 and "nh" in _vm_flags(arena.block.data_ptr() + arena.capacity // 2)
