"""The generate-based engine: transformers' `generate` in static batches, PEFT for adapters.

It runs what the batched engine does not (any architecture transformers loads; DoRA, prompt-tuning and
other PEFT adapters) and is the reference the batched engine's outputs are tested against."""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import torch

from tunelab.errors import TunelabError
from tunelab.infer.api import Request, RequestHandle, StepEngine, cut_at_stop, eos_ids, prompt_ids
from tunelab.infer.grammar import compile_grammar
from tunelab.infer.structured import StructuredLogitsProcessor, new_state
from tunelab.models import same_model
from tunelab.runs.adapter_folder import read_adapter_folder

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


def check_adapter(adapter: str | Path, base_spec: str | None, base_config) -> dict:
    """The adapter's config, after checking the folder fits this base: trained on `base_spec` (when run.json
    says), with the rope scaling the base runs, and (prompt tuning) its hidden size."""
    folder = read_adapter_folder(adapter)
    if base_spec is not None:
        folder.check_base(base_spec, same_model)
    folder.check_rope(getattr(base_config, "rope_parameters", None))
    folder.check_hidden_size(getattr(base_config, "hidden_size", None))
    return folder.config


class GenerateEngine(StepEngine):
    """Requests grouped into static batches of `batch_size` rows and run through `model.generate`.

    LoRA-type adapters share one PeftModel (`self.model`) and mix in a batch through PEFT's `adapter_names`.
    Prompt-learning adapters (prompt tuning, prefix tuning, P-tuning) cannot take `adapter_names` and PEFT
    cannot hold them next to LoRA ones, so each gets its own PeftModel on the same base weights and its
    rows run on their own, with the LoRA layers switched off: one row per call, because PEFT ignores
    position ids for them, so in a left-padded batch the pads would sit between the virtual tokens and
    the prompt and shift every distance (the outputs would differ from the same row alone)."""

    def __init__(self, model, tokenizer, device: str = "cpu", batch_size: int = 16):
        self.model, self.tokenizer, self.device, self.batch_size = model, tokenizer, device, batch_size
        tokenizer.padding_side = "left"
        self._base = model  # the transformers model every PeftModel wraps
        self._lora: list[str] = []  # adapters on self.model, mixed per row with adapter_names
        self._prompt: dict[str, object] = {}  # prompt-learning adapter name -> its own PeftModel
        self.vocab_size = model.config.vocab_size
        self._queue: list[RequestHandle] = []  # added, not yet run
        self._decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)

    @property
    def adapters(self) -> list[str]:
        return [*self._lora, *self._prompt]

    def add_adapter(self, name: str, path: str, slot: int | None = None) -> None:  # slot: no stacked weights here
        from peft import PeftConfig, PeftModel

        if name in self.adapters:
            raise TunelabError(f"an adapter named {name!r} is already loaded; remove it first.")
        read_adapter_folder(path)  # not an adapter folder: the one clear error
        try:
            if PeftConfig.from_pretrained(str(path)).is_prompt_learning:
                self._prompt[name] = PeftModel.from_pretrained(self._base, str(path), adapter_name=name).eval()
                return
            if not self._lora:
                self.model = PeftModel.from_pretrained(self._base, str(path), adapter_name=name)
            else:
                self.model.load_adapter(str(path), adapter_name=name)
        except (RuntimeError, ValueError, KeyError) as e:
            raise TunelabError(f"adapter {path} does not fit the base model: {e}") from None
        self.model.eval()
        self._lora.append(name)

    def remove_adapter(self, name: str) -> None:
        if any(h.request.adapter == name for h in self._queue):
            raise TunelabError(f"adapter {name!r} is in use by requests in flight; remove it when they finish.")
        if name in self._prompt:
            del self._prompt[name]
            return
        if name not in self._lora:
            raise TunelabError(f"no adapter named {name!r} is loaded (loaded: {', '.join(self.adapters)}).")
        self.model.delete_adapter(name)
        self._lora.remove(name)

    def _model_for(self, adapter: str | None):
        """(model, context) for rows of one prompt-learning adapter, or for base/LoRA rows."""
        if adapter in self._prompt:  # its base forward must not pick up the LoRA layers
            return self._prompt[adapter], self.model.disable_adapter() if self._lora else nullcontext()
        return self.model, nullcontext()

    def compile_grammar(self, schema=None, regex: str | None = None, ebnf: str | None = None):
        """A grammar for SamplingParams.grammar, for this tokenizer and the model's logits width."""
        return compile_grammar(self.tokenizer, schema, regex, ebnf, vocab_size=self.vocab_size)

    # requests -------------------------------------------------------------------------------------------
    def add_request(self, request: Request) -> RequestHandle:
        """Queue a request; a later `step()` runs it (in one `generate` call with the requests it can share)."""
        self._check_names([request])
        h = RequestHandle(request, prompt_ids(self.tokenizer, request), self._decode, time.perf_counter())
        self._queue.append(h)
        return h

    def has_unfinished(self) -> bool:
        return bool(self._queue)

    def abort(self, handle: RequestHandle) -> None:
        if handle.finished:
            return
        handle.finish_reason = "cancelled"
        if handle in self._queue:
            self._queue.remove(handle)

    def _key(self, h: RequestHandle) -> tuple:
        """Requests with equal keys can share a generate call (one max_new_tokens, stop strings, sampling)."""
        p = h.params
        prompt_adapter = h.request.adapter if h.request.adapter in self._prompt else ""  # batches on its own
        return (prompt_adapter, p.grammar is not None, p.max_new_tokens, p.stop, p.temperature, p.top_p, p.seed,
                p.ignore_eos)

    def step(self) -> list[RequestHandle]:
        """One `generate` call: the oldest queued request and the queued ones that can share its batch, up to
        batch_size. Prompt-learning rows and seeded sampled rows run alone (see the class docstring; a seeded
        row's tokens must not depend on what shares its batch). Returns them, finished."""
        if not self._queue:
            return []
        key = self._key(self._queue[0])
        p = self._queue[0].params
        size = 1 if key[0] or (p.temperature > 0 and p.seed is not None) else self.batch_size
        batch = [h for h in self._queue if self._key(h) == key][:size]
        taken = {id(h) for h in batch}
        self._queue = [h for h in self._queue if id(h) not in taken]
        self._run(batch)
        return batch

    @torch.inference_mode()
    def _run(self, batch: list[RequestHandle]) -> None:
        tok, p = self.tokenizer, batch[0].params
        model, context = self._model_for(batch[0].request.adapter)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        n_prompt = max(len(h.prompt_ids) for h in batch)
        ids = torch.full((len(batch), n_prompt), pad, dtype=torch.long)  # (B, T_prompt), padded on the left
        mask = torch.zeros_like(ids)
        for b, h in enumerate(batch):
            ids[b, n_prompt - len(h.prompt_ids):] = torch.tensor(h.prompt_ids)
            mask[b, n_prompt - len(h.prompt_ids):] = 1
        kwargs = dict(max_new_tokens=p.max_new_tokens, pad_token_id=pad, do_sample=p.temperature > 0)
        if p.ignore_eos:  # go on past end-of-sequence (not suppress it, as min_new_tokens would), as vLLM does
            kwargs["eos_token_id"] = None
        if p.temperature > 0:
            kwargs.update(temperature=p.temperature, top_p=p.top_p)
            if p.seed is not None:
                torch.manual_seed(p.seed)
        if p.stop:
            kwargs.update(stop_strings=list(p.stop), tokenizer=tok)
        states = None
        if p.grammar is not None:
            states, kwargs["logits_processor"] = _grammar_processor(batch, pad)
        if batch[0].request.adapter not in self._prompt and self._lora:
            kwargs["adapter_names"] = [h.request.adapter or BASE for h in batch]
        with context:
            out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), **kwargs)
        if states is not None:  # generate makes no call after the last token: let the states accept it
            kwargs["logits_processor"][0].finish(out[:, n_prompt:])
        now = time.perf_counter()
        for b, h in enumerate(batch):
            new, reason = self._trim(out[b, n_prompt:].tolist(), p, pad)
            if states is not None and reason != "stop_string":
                reason = states[b].finish_reason
            h.token_ids, h.finish_reason = new, "stop" if reason == "stop_string" else reason
            h.grammar = states[b] if states is not None else None  # its report (no re-sampling in generate)
            h.first_token_time = h.finish_time = now

    def _trim(self, ids: list[int], p, pad: int) -> tuple[list[int], str]:
        """A row's generated tokens without generate's padding, and why it ended ("stop_string", "stop" at an
        end-of-sequence token, "length")."""
        if p.stop and cut_at_stop(self._decode(ids), p.stop)[1]:
            while len(ids) > 1 and ids[-1] == pad:  # generate pads a row it ended on a stop string
                ids.pop()
            return ids, "stop_string"
        eos = eos_ids(self._base, self.tokenizer)  # read now: generation_config may have changed
        ends = [] if p.ignore_eos else [k for k, t in enumerate(ids) if t in eos]
        if ends:
            return ids[:ends[0] + 1], "stop"
        return ids, "length"

    def _check_names(self, reqs: list[Request]) -> None:
        unknown = [q.adapter for q in reqs if q.adapter is not None and q.adapter not in self.adapters]
        if unknown:
            raise TunelabError(f"no adapter named {unknown[0]!r} is loaded (loaded: {', '.join(self.adapters)}).")


def _grammar_processor(batch: list[RequestHandle], pad_token_id: int | None = None):
    """(per-row grammar states, a LogitsProcessorList running them): each row its own grammar, always finished
    within max_new_tokens. Greedy rows are vetted exactly (slack 0); sampled ones keep a reserve."""
    from transformers import LogitsProcessorList

    greedy = batch[0].params.temperature == 0
    states = [new_state(h.params.grammar, h.params.max_new_tokens, vet=greedy) for h in batch]
    return states, LogitsProcessorList([StructuredLogitsProcessor(states, vet=greedy, pad_token_id=pad_token_id)])
