"""Activation memory of a training step, derived tensor by tensor for a Llama-style decoder block.

The functions below walk the forward pass of transformers' Llama block (RMSNorm, attention through
SDPA or eager, SwiGLU MLP) and PEFT's LoRA `Linear`, and record each tensor autograd saves for
backward, with its dtype. Whether a tensor is saved depends on what requires grad (a frozen linear
keeps only its weight; LoRA's `lora_A` keeps its dropped-out input, and the dropout keeps its mask), so
the walk carries a requires-grad flag, as autograd does. Tensors are named so that one tensor saved
by two ops counts once, as storages do. Under autocast each linear and SDPA keep their own 16-bit
copies of their inputs. Sizes are per token (x batch x sequence), except the eager attention
probabilities (x sequence again) and the rotary tables (per position). Eager attention is walked
without autocast; Gemma 2's sandwich norms and soft-capped logits are approximated.

Checked against exact tensor accounting in tests/test_memory_measure.py and bench/memory_accuracy.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tunelab.memory.arch import Arch

INDEX = 8  # int64 token ids / labels
FP32 = 4


@dataclass(frozen=True)
class Setup:
    """How a step runs: what trains, in which dtypes, on which device."""

    stream: int  # bytes/element of hidden states (the weights' dtype; fp32 for QLoRA after k-bit prep)
    base_trainable: bool  # full finetuning: every weight trains (norms, embeddings, head too)
    lora_targets: frozenset[str] = frozenset()  # short module names carrying LoRA adapters
    lora_r: int = 0
    lora_dropout: bool = False
    input_grad: bool = False  # hidden states require grad from the embedding on
    embed_trainable: bool = False
    head_bytes: int = 4  # dtype of the output head, hence of the logits
    attention: str = "sdpa"  # sdpa (flash / memory-efficient kernels) | eager
    device: str = "cuda"  # cuda or cpu: both keep a 1-byte dropout mask (tunelab's FastDropout on CPU)
    grad_ckpt: bool = False
    extra_tokens: int = 0  # soft-prompt virtual tokens prepended to every sequence
    quantized: bool = False  # QLoRA: base linears are bitsandbytes 4-bit
    loss: str = "hf"  # hf: transformers' loss (fp32 log-softmax); chunked: tunelab.models.losses.weighted_loss
    loss_chunk: int = 256  # positions per fp32 softmax chunk of the chunked loss
    autocast: int = 0  # bytes of torch.autocast's compute dtype (2), or 0 when autocast is off

    @property
    def mask_bytes(self) -> int:  # nn.Dropout on CPU keeps an fp32 mask; tunelab swaps it for FastDropout
        return 1


@dataclass(frozen=True)
class _T:
    name: str
    elems: float  # per token
    size: int  # bytes per element
    rg: bool  # requires grad


@dataclass
class _Saved:
    per_token: dict[str, float] = field(default_factory=dict)
    per_position: dict[str, float] = field(default_factory=dict)

    def save(self, t: _T) -> None:
        self.per_token.setdefault(t.name, t.elems * t.size)

    def bytes(self, tokens: int, positions: int) -> int:
        return int(sum(self.per_token.values()) * tokens + sum(self.per_position.values()) * positions)


def _norm(g: _Saved, x: _T, name: str, a: Arch, s: Setup) -> _T:
    """RMSNorm: x.float(); x * rsqrt(mean(x^2) + eps); weight * x.to(dtype)."""
    w = s.base_trainable
    if not (x.rg or w):
        return _T(name, a.hidden, s.stream, False)
    if x.rg:
        g.save(x if x.size == FP32 else _T(name + ".x32", a.hidden, FP32, True))  # pow and mul keep it
        g.save(_T(name + ".rstd", 1, FP32, True))
    if w:  # the weight's gradient needs the normalized input
        g.save(_T(name + ".n", a.hidden, FP32 if a.model_type.startswith("gemma") else s.stream, x.rg))
    return _T(name, a.hidden, s.stream, True)


def _cast(x: _T, size: int, name: str) -> _T:
    """x in another dtype: a new tensor unless it already has that dtype."""
    return x if x.size == size else _T(name, x.elems, size, x.rg)


def _linear(g: _Saved, x: _T, name: str, short: str, n_out: int, s: Setup) -> _T:
    """nn.Linear (trainable: keeps its input) plus a LoRA adapter when `short` is targeted.

    Under autocast every linear casts its own copy of the input to the compute dtype (4-bit layers
    compute in their own dtype and return the input's).
    """
    lora = short in s.lora_targets
    ac = s.autocast
    if s.base_trainable:
        g.save(_cast(x, ac, name + ".in16") if ac else x)
    out_size = ac if ac and not s.quantized else s.stream
    if lora:
        xa = _cast(x, FP32, name + ".x32")  # PEFT casts the input to the adapter's dtype (fp32)
        if s.lora_dropout:
            if x.rg:
                g.save(_T(name + ".mask", x.elems, s.mask_bytes, False))
            xa = _T(name + ".drop", x.elems, FP32, x.rg)
        g.save(_cast(xa, ac, name + ".a16") if ac else xa)  # lora_A's weight gradient needs its input
        g.save(_T(name + ".lora_a", s.lora_r, ac or FP32, True))  # lora_B's needs lora_A's output
    return _T(name, n_out, out_size, x.rg or s.base_trainable or lora)


def _attention(g: _Saved, x: _T, p: str, a: Arch, s: Setup, seq: int) -> _T:
    q_dim, kv_dim = a.q_dim, a.kv_dim
    if "self_attn.qkv_proj" in a.linears:  # fused projection (Phi-3): q, k, v are views of one output
        qkv = _linear(g, x, p + "qkv", "qkv_proj", q_dim + 2 * kv_dim, s)
        q = k = qkv
        v = _T(qkv.name, q_dim + 2 * kv_dim, qkv.size, qkv.rg)
    else:
        q = _linear(g, x, p + "q", "q_proj", q_dim, s)
        k = _linear(g, x, p + "k", "k_proj", kv_dim, s)
        v = _linear(g, x, p + "v", "v_proj", kv_dim, s)
    # rotary embedding writes new tensors (cos and sin come in the hidden states' dtype)
    qr = _T(p + "q_rope", q_dim, max(q.size, s.stream), q.rg)
    kr = _T(p + "k_rope", kv_dim, max(k.size, s.stream), k.rg)
    if q.rg or k.rg:  # q * cos and rotate_half(q) * sin keep cos and sin, shared by all layers
        g.per_position["rope"] = 2 * a.head_dim * s.stream
    size = s.autocast or s.stream
    if s.attention != "eager":
        out_rg = q.rg or k.rg or v.rg
        if out_rg:  # flash / memory-efficient SDPA keep q, k, v (autocast: cast copies), the output, fp32 lse
            for t in (_cast(qr, size, p + "q16"), _cast(kr, size, p + "k16"), _cast(v, size, p + "v16"),
                      _T(p + "attn", q_dim, size, True), _T(p + "lse", a.heads, FP32, True)):
                g.save(t)
        attn = _T(p + "attn", q_dim, size, out_rg)  # laid out (B, T, H, D): o_proj reads it as is
    else:
        rep = a.heads // a.kv_heads
        kk = kr if rep == 1 else _T(p + "k_rep", q_dim, s.stream, kr.rg)  # repeat_kv copies for GQA
        vv = v if rep == 1 else _T(p + "v_rep", q_dim, s.stream, v.rg)
        if kk.rg:
            g.save(qr)
        if qr.rg:
            g.save(kk)
        scores_rg = qr.rg or kk.rg
        probs32 = _T(p + "probs32", a.heads * seq, FP32, scores_rg)  # softmax in fp32: (B, H, T, T)
        if scores_rg:
            g.save(probs32)
        probs = probs32 if s.stream == FP32 else _T(p + "probs", a.heads * seq, s.stream, scores_rg)
        if vv.rg:
            g.save(probs)
        if probs.rg:
            g.save(vv)
        attn = _T(p + "attn_t", q_dim, s.stream, probs.rg or vv.rg)  # transpose(1, 2).contiguous()
    return _linear(g, attn, p + "o", "o_proj", a.hidden, s)


def _mlp(g: _Saved, x: _T, p: str, a: Arch, s: Setup) -> _T:
    inter = a.intermediate
    if "mlp.gate_up_proj" in a.linears:  # fused (Phi-3): gate and up are views of one output
        gate = up = _linear(g, x, p + "gate_up", "gate_up_proj", 2 * inter, s)
    else:
        gate = _linear(g, x, p + "gate", "gate_proj", inter, s)
        up = _linear(g, x, p + "up", "up_proj", inter, s)
    if gate.rg:
        g.save(gate)  # SiLU / GELU keep their input
    act = _T(p + "act", inter, gate.size, gate.rg)
    if up.rg:
        g.save(act)
    if act.rg:
        g.save(up)
    prod = _T(p + "prod", inter, max(act.size, up.size), act.rg or up.rg)
    return _linear(g, prod, p + "down", "down_proj", a.hidden, s)


def _layer(g: _Saved, x: _T, i: int, a: Arch, s: Setup, seq: int) -> _T:
    p = f"{i}."
    post_norms = a.norms_per_layer >= 4  # Gemma 2 also normalizes each sublayer's output
    h = _attention(g, _norm(g, x, p + "ln1", a, s), p, a, s, seq)
    if post_norms:
        h = _norm(g, h, p + "ln1_post", a, s)
    x = _T(p + "res1", a.hidden, s.stream, x.rg or h.rg)  # residual adds keep nothing
    h = _mlp(g, _norm(g, x, p + "ln2", a, s), p, a, s)
    if post_norms:
        h = _norm(g, h, p + "ln2_post", a, s)
    return _T(p + "res2", a.hidden, s.stream, x.rg or h.rg)


@dataclass(frozen=True)
class Activations:
    """Bytes of one forward pass kept for backward, and what backward briefly adds on top."""

    kept: int  # alive at the end of the forward pass (excluding logits)
    kept_by_layers: int  # of which still alive once backward has passed the final norm and head
    recompute: int  # checkpointing: one layer's saved tensors while it is recomputed in backward
    layer_backward: int  # gradients flowing through one layer's backward
    logits: int  # peak of vocab-wide tensors: logits, fp32 log-softmax, their gradients
    logits_after_softmax: int  # vocab-wide tensors left when the head's backward runs
    logits_held: int  # the logits tensor itself, held by the caller until backward ends
    per_layer: int  # one (middle) layer's saved tensors, no checkpointing


def _layer_backward(a: Arch, s: Setup, tokens: int, seq: int) -> int:
    """Bytes briefly alive on top of saved tensors while the last layer runs backward (or is recomputed).

    Calibrated against measurement (bench/memory_accuracy.py), named by what is alive at the peak.
    """
    h, inter = a.hidden, a.intermediate
    if s.base_trainable:  # MLP backward: gradients of the layer output and of down_proj's input, then
        weight_grad = max(i * o for i, o in a.linears.values()) * s.stream  # down_proj's weight gradient
        out = tokens * (h + inter) * s.stream + max(weight_grad, tokens * inter * s.stream)  # or SwiGLU's
    elif s.lora_targets:  # end of the recompute: PEFT's fp32 LoRA-branch temporaries, the MLP product
        lora_tmp = (5 if s.quantized else 4) * h * FP32  # 4-bit layers' outputs are also cloned
        out = tokens * (lora_tmp + inter * s.stream + (inter * FP32 if s.stream != FP32 else 0))
        if not s.lora_dropout:  # without dropout copies the MLP backward's gradients can be larger
            out = max(out, tokens * (h + 2 * inter) * s.stream)
    else:  # frozen layer: gradients of the output, of down_proj's input and of the product's two factors
        out = tokens * (h + 3 * inter) * s.stream
    if s.attention == "eager":  # softmax backward: gradients of the (B, H, T, T) probabilities
        out += tokens * 2 * a.heads * seq * FP32
    return out


def activation_memory(a: Arch, s: Setup, batch: int, seq: int, weight_copies: int = 0,
                      head_copy: int = 0) -> Activations:
    """Derive the activation bytes of one micro-batch of `batch` x `seq` tokens.

    weight_copies, head_copy: bytes of the compute-dtype weight copies autocast makes and backward
    keeps (layers' linears; the output head), added as they are allocated in the forward pass.
    """
    seq = seq + s.extra_tokens
    tokens = batch * seq
    g = _Saved()
    x = _T("embed", a.hidden, s.stream, s.input_grad or s.embed_trainable)
    layer_inputs = []
    per_layer = _Saved()
    for i in range(a.layers):  # layers differ only in what requires grad; walk them all
        layer_inputs.append(x)
        lg = _Saved()
        x = _layer(lg, x, i, a, s, seq)
        if i == min(1, a.layers - 1):
            per_layer = lg
        if not s.grad_ckpt:
            g.per_token.update({k: v for k, v in lg.per_token.items() if k not in g.per_token})
        g.per_position.update(lg.per_position)
    if s.grad_ckpt:  # non-reentrant checkpointing keeps each layer's inputs for the recompute ...
        for t in layer_inputs:
            g.save(t)
        if s.attention == "eager":  # ... including the (B, 1, T, T) causal mask eager attention adds
            g.per_position["mask"] = batch * seq * s.stream
        if s.extra_tokens:  # the word embeddings, made a grad-requiring leaf, stay referenced by the graph
            g.save(_T("word_embeds", a.hidden * (seq - s.extra_tokens) / seq, s.stream, True))
    if s.loss == "chunked":  # weighted_loss keeps positions (batch, time), targets and fp32 weights
        g.save(_T("loss_index", 1, 3 * INDEX + FP32, False))
    else:  # nll_loss keeps the shifted labels
        g.save(_T("labels", 1, INDEX, False))
    if s.grad_ckpt:  # checkpointed layers drop their weight copies too; one layer's come back in recompute
        layer_copies, weight_copies = weight_copies // a.layers, 0
    before_head = g.bytes(tokens, seq) + weight_copies
    n = _norm(g, x, "final_norm", a, s)
    if s.base_trainable:  # the head's weight gradient needs its input
        g.save(_cast(n, s.autocast, "final_norm.in16") if s.autocast else n)
    kept = g.bytes(tokens, seq) + weight_copies + head_copy
    recompute = 0
    if s.grad_ckpt:
        held = set(g.per_token)
        recompute = int(sum(v for k, v in per_layer.per_token.items() if k not in held) * tokens) + layer_copies

    vocab = tokens * a.vocab
    softcap = a.model_type.startswith("gemma")  # final-logit soft-capping keeps tanh's output
    held = vocab * s.head_bytes * (2 if softcap else 1)
    grad = vocab * s.head_bytes  # the logits' gradient reaching the head
    if s.loss == "chunked":  # per chunk of positions, fp32: the chunk's logits and softmax, and (when
        positions = tokens - batch  # there are several chunks) the previous chunk's, until rebound
        chunk = min(s.loss_chunk, positions) * a.vocab
        several = positions > s.loss_chunk
        logits = held + grad + chunk * (((3 if s.head_bytes < FP32 else 4) if several else 2) * FP32)
    else:  # + fp32 log-softmax (kept), its gradient and the input's gradient, all (B, T, V)
        logits = held + 3 * vocab * FP32
    return Activations(
        kept=kept, kept_by_layers=before_head, recompute=recompute,
        layer_backward=_layer_backward(a, s, tokens, seq), logits=logits,
        logits_after_softmax=held + grad, logits_held=held, per_layer=per_layer.bytes(tokens, 0),
    )
