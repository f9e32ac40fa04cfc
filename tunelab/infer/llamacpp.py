"""The single-stream engine on llama.cpp: one request at a time through llama-cpp-python, on a GGUF of the
model's own weights that this module writes (and caches) the first time it runs them.

One request at a time, a forward is a few hundred small ops; torch's eager dispatch spends more on them than on
the arithmetic, and llama.cpp's graph does not (bench/generate_throughput.py, single-stream section). The
engine contract is the batched engine's: the same tokenizer (llama.cpp is given token ids, never text), the
same picking (engine.Picker: greedy or seeded sampling, grammar masks with the always-finish vetting, stop
strings, end of sequence), so the outputs are the batched engine's within bf16/f16 rounding: bf16 weights are
written as f16 (which holds every bf16 value of a normal weight exactly), fp32 as f32. A LoRA adapter runs
merged into its own GGUF (W + scale * B @ A), as fast as the base, written on its first request.

Greedy rows decode with prompt lookup (speculative decoding whose draft is copied from the prompt and answer so
far): each step runs the last token and up to DRAFT_TOKENS drafted ones in one forward, and the picker takes
the positions in order while the draft holds. The tokens are those of one token per step (a forward over
several positions rounds in f16 a little differently; fp32 tests check equality), and on orders-json about two
of three draft tokens hold, so a step yields ~3 tokens for ~2.7x the time of one (1.33x llama.cpp's own
tokens/s on the base, 2026-12-07: docs/benchmarks.md).

GGUFs live in $TUNELAB_HOME/gguf-cache, named by a hash of the weights and config they hold; the CACHE_FILES
most recently used are kept.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

from tunelab.config.paths import tunelab_home
from tunelab.errors import TunelabError
from tunelab.infer.api import Request, StepEngine, eos_ids, prompt_ids
from tunelab.infer.engine import AGAIN, Picker, Row
from tunelab.infer.grammar import compile_grammar
from tunelab.infer.lora import read_adapter

GGUF_TYPE = {torch.float32: "f32", torch.bfloat16: "f16", torch.float16: "f16"}
CACHE_FILES = 4  # GGUFs kept in the cache, most recently used first (a model plus a few merged adapters)
MAX_CONTEXT = 4096  # llama.cpp's KV cache is allocated whole: the model's context, at most this
DRAFT_TOKENS = 8  # tokens drafted per greedy step: a forward of 9 tokens costs ~2.7x one of 1 here
DRAFT_NGRAM = 3  # the longest suffix looked up; 2 the shortest (one token matched too often in vain)


def available() -> bool:
    """Whether llama-cpp-python is installed (the `llamacpp` extra)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def unsupported(model) -> str | None:
    """Why the llama.cpp engine cannot run `model` (None: it can): the GGUF writer's architectures, plain float
    weights on the CPU, positions without rope scaling (the writer records none)."""
    from tunelab.models.gguf_write import SUPPORTED

    cfg = model.config
    archs = _architectures(model)
    if not any(a in SUPPORTED for a in archs):
        return f"llama.cpp runs {', '.join(SUPPORTED)} here, not {', '.join(archs)}"
    if getattr(model, "hf_quantizer", None) is not None or model.dtype not in GGUF_TYPE:
        return "quantized weights"
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        return f"rope scaling {rope.get('rope_type')!r}"
    if next(model.parameters()).device.type != "cpu":
        return "a model on a GPU"
    return None


def _architectures(model) -> list[str]:
    """The config's architectures; a model built in code has none: its class."""
    return list(getattr(model.config, "architectures", None) or [type(model).__name__])


def _state(model) -> dict[str, torch.Tensor]:
    """The model's weights under transformers' names (the batched engine wraps adapted layers: `.base.`)."""
    return {re.sub(r"_proj\.base\.weight$", "_proj.weight", k): v for k, v in model.state_dict().items()}


def _merged(state: dict[str, torch.Tensor], adapter) -> dict[str, torch.Tensor]:
    """`state` with the adapter's LoRA folded in (W + scale * B @ A, in fp32); other tensors shared, not copied."""
    out = dict(state)
    for (layer, module), (a, b) in adapter.weights.items():
        part = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        key = f"model.layers.{layer}.{part}.{module}.weight"
        w = state[key]
        if (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise TunelabError(f"adapter {adapter.path} does not fit the base model: layer {layer} {module} maps "
                               f"{a.shape[1]} -> {b.shape[0]} features, the base's {w.shape[1]} -> {w.shape[0]}.")
        out[key] = (w.float() + adapter.scale * (b.float() @ a.float())).to(w.dtype)
    return out


def _fingerprint(state: dict[str, torch.Tensor], config) -> str:
    h = hashlib.blake2b(config.to_json_string().encode(), digest_size=12)
    for k in sorted(state):
        t = state[k].detach().contiguous()
        h.update(k.encode())
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()


def lookup_draft(ids: list[int], k: int) -> list[int]:
    """Prompt lookup (Saxena 2023; vLLM's ngram proposer): the up to k tokens that followed the most recent
    earlier occurrence of the last DRAFT_NGRAM (else shorter) tokens. Extraction answers copy their input, so
    drafts often hold; one that does not costs a slightly longer forward. By hand: no library drafts from token
    ids alone."""
    for n in range(DRAFT_NGRAM, 1, -1):
        if k < 1 or len(ids) <= n:
            continue
        tail = ids[-n:]
        for s in range(len(ids) - n - 1, -1, -1):
            if ids[s:s + n] == tail:
                return ids[s + n:s + n + k]
    return []


def _eval_all(llm, tokens: list[int]) -> None:
    """llama_cpp.Llama.eval with logits at every position: Llama computes the last one only unless it was built
    with logits_all, which every prompt's prefill would then pay for (internals of the pinned 0.3.36)."""
    llm._ctx.kv_cache_seq_rm(-1, llm.n_tokens, -1)
    llm._batch.set_batch(batch=tokens, n_past=llm.n_tokens, logits_all=True)
    llm._ctx.decode(llm._batch)
    llm.input_ids[llm.n_tokens:llm.n_tokens + len(tokens)] = tokens
    llm.n_tokens += len(tokens)


class _Weights:
    """What the GGUF writer reads from a model: its config and state dict."""

    def __init__(self, config, state: dict[str, torch.Tensor]):
        self.config, self._state = config, state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def write_cached(model, tokenizer, folder: Path, state: dict[str, torch.Tensor]) -> Path:
    """The GGUF of `state` (the model's weights, or merged ones), written once into the cache and reused."""
    from tunelab.models.gguf_write import write_gguf

    quant = GGUF_TYPE[model.dtype]
    path = tunelab_home() / "gguf-cache" / f"{_fingerprint(state, model.config)}-{quant}.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        config = copy.deepcopy(model.config)
        config.architectures = _architectures(model)
        write_gguf(_Weights(config, state), tokenizer, Path(folder), tmp, quant, name=Path(folder).name)
        tmp.replace(path)
    os.utime(path)  # most recently used: the last to go
    for old in sorted(path.parent.glob("*.gguf"), key=lambda p: p.stat().st_mtime, reverse=True)[CACHE_FILES:]:
        old.unlink(missing_ok=True)  # a model llama.cpp has open keeps its mapping
    return path


class LlamaCppEngine(StepEngine):
    """Requests one at a time, in arrival order, each forward run by llama.cpp on `threads` threads."""

    def __init__(self, model, tokenizer, folder: str | Path, threads: int | None = None, load_base: bool = True):
        """folder: the model's local folder (the GGUF takes its tokenizer files). threads: torch's by default.
        load_base: False leaves the base's llama.cpp model to `prepare` (tunelab.infer.routed, on a worker thread)."""
        why = unsupported(model) or (None if available() else "llama-cpp-python is not installed")
        if why:
            raise TunelabError(f"the llama.cpp engine cannot run this: {why}; use the batched engine.")
        self.model, self.tokenizer, self.device, self.folder = model, tokenizer, "cpu", Path(folder)
        self.vocab_size = model.config.vocab_size
        self.picker = Picker(eos_ids(model, tokenizer), self.vocab_size, 1)
        self.threads = threads or torch.get_num_threads()
        self.context = min(getattr(model.config, "max_position_embeddings", MAX_CONTEXT), MAX_CONTEXT)
        self._adapters: dict[str, object] = {}  # name -> LoraWeights (merged into a GGUF on first use)
        self._llms: dict[str | None, object] = {}  # adapter name (None: the base) -> llama_cpp.Llama
        self.waiting: deque[Row] = deque()
        self.current: Row | None = None
        self._decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
        self.drafts = {"forwards": 0, "drafted": 0, "taken": 0}  # decode forwards, draft tokens run and taken
        if load_base:
            self._llm(None)  # the base's GGUF now (written once), not in the first request's time to first token

    # adapters -------------------------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        return list(self._adapters)

    def add_adapter(self, name: str, path: str, slot: int | None = None) -> None:  # slot: no stacked weights
        if name in self._adapters:
            raise TunelabError(f"an adapter named {name!r} is already loaded; remove it first.")
        lw = read_adapter(name, path, self.model.config.num_hidden_layers, torch.float32, torch.device("cpu"))
        _merged(_state(self.model), lw)  # does not fit: the error now, not at its first request
        self._adapters[name] = lw

    def remove_adapter(self, name: str) -> None:
        self._known(name)
        if any(r.request.adapter == name for r in [*self.waiting, *([self.current] if self.current else [])]):
            raise TunelabError(f"adapter {name!r} is in use by requests in flight; remove it when they finish.")
        del self._adapters[name]
        llm = self._llms.pop(name, None)
        if llm is not None:
            llm.close()

    def compile_grammar(self, schema=None, regex: str | None = None, ebnf: str | None = None):
        """A grammar for SamplingParams.grammar, for this tokenizer and the model's logits width."""
        return compile_grammar(self.tokenizer, schema, regex, ebnf, vocab_size=self.vocab_size)

    def ready(self, adapter: str | None) -> bool:
        """Whether the llama.cpp model of the base (None) or `adapter` is loaded: its request starts at once."""
        return adapter in self._llms

    def prepare(self, adapter: str | None) -> None:
        """Load the llama.cpp model of the base (None) or `adapter` now, its GGUF written when not cached. A worker
        thread may call it while the engine runs requests on models already `ready`, not on this one."""
        self._llm(adapter)

    def _known(self, name: str | None) -> None:
        if name is not None and name not in self._adapters:
            raise TunelabError(f"no adapter named {name!r} is loaded (loaded: {', '.join(self._adapters) or 'none'}).")

    def _llm(self, adapter: str | None):
        """The llama.cpp model for the base or an adapter (its merged GGUF), loaded on first use."""
        if adapter not in self._llms:
            import llama_cpp

            state = _state(self.model)
            if adapter is not None:
                state = _merged(state, self._adapters[adapter])
            path = write_cached(self.model, self.tokenizer, self.folder, state)
            # fp32 weights: an fp32 KV cache and plain attention, so the tokens equal the batched engine's. Else
            # an f16 cache and flash attention (one fused op per layer; its CPU kernel rounds Q to f16), about
            # 5% more tokens/s one request at a time here (bench/generate_throughput.py, single stream)
            exact = self.model.dtype == torch.float32
            kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if exact else {}
            self._llms[adapter] = llama_cpp.Llama(model_path=str(path), n_threads=self.threads,
                                                  n_threads_batch=self.threads, n_ctx=self.context,
                                                  logits_all=False, flash_attn=not exact, verbose=False, **kv)
        return self._llms[adapter]

    # requests -------------------------------------------------------------------------------------------
    def add_request(self, req: Request) -> Row:
        """Queue a request; a later `step()` runs it once the ones before it finished."""
        self._known(req.adapter)
        ids = prompt_ids(self.tokenizer, req)
        if len(ids) + req.params.max_new_tokens > self.context:
            raise TunelabError(f"request {req.id}: {len(ids)} prompt tokens + max_new_tokens "
                               f"{req.params.max_new_tokens} exceed the llama.cpp engine's context of "
                               f"{self.context}; use the batched engine (kind='batched').")
        row = Row(req, ids, 0, time.perf_counter(), self._decode)
        self.waiting.append(row)
        return row

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.current)

    def abort(self, row: Row) -> None:
        if row.finish_reason is not None:
            return
        row.finish_reason = "cancelled"
        if row is self.current:
            self.current = None
        elif row in self.waiting:
            self.waiting.remove(row)

    def step(self) -> list[Row]:
        """Run the current request's prompt (its first step) or its last token, with a draft of the tokens likely
        to follow when it decodes greedily, through llama.cpp and pick the next tokens. Returns the request once
        it finished."""
        if self.current is None:
            if not self.waiting:
                return []
            self.current = row = self.waiting.popleft()
            llm = self._llm(row.request.adapter)
            ids = row.prompt_ids
            # the KV of the previous request's prompt prefix is kept (one token at least is run for the logits)
            keep = min(len(os.path.commonprefix([llm.input_ids[:llm.n_tokens].tolist(), ids])), len(ids) - 1)
            llm.n_tokens = keep
            llm.eval(ids[keep:])
            row.cached_tokens = keep
            self.picker.choose([row], self._logits(llm))
        else:
            row = self.current
            llm = self._llms[row.request.adapter]
            self._decode_step(llm, row)
        if row.finish_reason is None:
            return []
        self.current = None
        if row.finish_reason == AGAIN:  # the grammar re-samples the answer: from its prompt again (KV kept)
            row.finish_reason = None
            self.waiting.appendleft(row)
            return []
        return [row]

    def _decode_step(self, llm, row: Row) -> None:
        """The row's last token and a draft (prompt lookup, greedy rows only) in one forward; the picker then
        takes the positions in order while the draft holds, so the tokens are those of one token per step (the
        batch's f16 rounding aside), and the KV of rejected draft tokens is dropped."""
        left = row.params.max_new_tokens - len(row.token_ids) - 1
        draft = lookup_draft(row.prompt_ids + row.token_ids, min(DRAFT_TOKENS, left)) \
            if row.generator is None and left > 0 else []
        past = llm.n_tokens
        if draft:
            _eval_all(llm, row.token_ids[-1:] + draft)
        else:
            llm.eval(row.token_ids[-1:])
        self.drafts["forwards"] += 1
        self.drafts["drafted"] += len(draft)
        for j in range(len(draft) + 1):
            self.picker.choose([row], self._logits(llm, j if draft else -1))
            if row.finish_reason is not None or j == len(draft) or row.token_ids[-1] != draft[j]:
                break
        self.drafts["taken"] += j
        llm.n_tokens = past + 1 + j  # the last token and the j draft tokens taken; the next eval drops the rest

    def _logits(self, llm, i: int = -1) -> torch.Tensor:
        """Position i's logits of the last eval (-1: its last), (1, V) fp32: a view of llama.cpp's buffer (the
        next eval overwrites it; the picker is done with it by then, grammar masks written into it included)."""
        import llama_cpp

        out = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, i), shape=(llm.n_vocab(),))
        return torch.from_numpy(out[:self.vocab_size]).view(1, -1)

    def close(self) -> None:
        """Free the llama.cpp models."""
        for llm in self._llms.values():
            llm.close()
        self._llms.clear()
