"""The generate-based engine: transformers' `generate` in static batches, PEFT for adapters.

It runs what the batched engine does not (any architecture transformers loads; DoRA, prompt-tuning and
other PEFT adapters) and is the reference the batched engine's outputs are tested against."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from threading import Thread

import torch

from tunelab.errors import TunelabError
from tunelab.infer.api import Completion, Request, chat_prompt, cut_at_stop
from tunelab.infer.structured import GrammarState, StructuredLogitsProcessor
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


class GenerateEngine:
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

    @property
    def adapters(self) -> list[str]:
        return [*self._lora, *self._prompt]

    def add_adapter(self, name: str, path: str) -> None:
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
        if name in self._prompt:
            del self._prompt[name]
            return
        if name not in self._lora:
            raise TunelabError(f"no adapter named {name!r} is loaded (loaded: {', '.join(self.adapters)}).")
        self.model.delete_adapter(name)
        self._lora.remove(name)

    def _model_for(self, adapter: str | None):
        """(model, generate kwargs, context) for rows of one prompt-learning adapter, or for base/LoRA rows."""
        if adapter in self._prompt:  # its base forward must not pick up the LoRA layers
            return self._prompt[adapter], self.model.disable_adapter() if self._lora else nullcontext()
        return self.model, nullcontext()

    def generate(self, requests: list[Request], progress=None) -> list[Completion]:
        """Rows that share max_new_tokens, stop strings, sampling and grammar-or-not run in the same batches."""
        def key(i):
            q = requests[i]
            prompt_adapter = q.adapter if q.adapter in self._prompt else ""  # its rows batch on their own
            return (prompt_adapter, q.grammar is not None, q.max_new_tokens, tuple(q.stop), q.temperature, q.top_p, q.seed, q.ignore_eos)

        order = sorted(range(len(requests)), key=key)
        out: list[Completion | None] = [None] * len(requests)
        done = 0
        i = 0
        while i < len(order):
            j = i
            size = 1 if key(order[i])[0] else self.batch_size  # prompt learning: one row per call (see above)
            while j < len(order) and j - i < size and key(order[j]) == key(order[i]):
                j += 1
            batch = [requests[k] for k in order[i:j]]
            for k, c in zip(order[i:j], self._batch(batch)):
                out[k] = c
            done += j - i
            if progress is not None:
                progress(done)
            i = j
        return out

    @torch.inference_mode()
    def _batch(self, reqs: list[Request]) -> list[Completion]:
        tok, q0 = self.tokenizer, reqs[0]
        model, context = self._model_for(q0.adapter)
        enc = tok([chat_prompt(tok, q.prompt) for q in reqs], return_tensors="pt", padding=True,
                  add_special_tokens=False)
        kwargs = dict(max_new_tokens=q0.max_new_tokens, pad_token_id=tok.pad_token_id, do_sample=q0.temperature > 0)
        if q0.ignore_eos:  # go on past end-of-sequence (not suppress it, as min_new_tokens would), as vLLM does
            kwargs["eos_token_id"] = None
        if q0.temperature > 0:
            kwargs.update(temperature=q0.temperature, top_p=q0.top_p)
            if q0.seed is not None:
                torch.manual_seed(q0.seed)
        if q0.stop:
            kwargs.update(stop_strings=list(q0.stop), tokenizer=tok)
        states = None
        if q0.grammar is not None:
            states, kwargs["logits_processor"] = _grammar_processor(reqs, tok.pad_token_id)
        if q0.adapter not in self._prompt:
            self._check_names(reqs)
            if self._lora:
                kwargs["adapter_names"] = [q.adapter or BASE for q in reqs]
        n_prompt = enc["input_ids"].shape[1]
        with context:
            out = model.generate(**enc.to(model.device), **kwargs)  # (B, T_prompt + new)
        if states is not None:  # generate makes no call after the last token: let the states accept it
            kwargs["logits_processor"][0].finish(out[:, n_prompt:])
        result = []
        for b, q in enumerate(reqs):
            ids = out[b, n_prompt:].tolist()
            eos = [k for k, t in enumerate(ids) if t in (tok.eos_token_id, tok.pad_token_id)]
            ids = ids[:eos[0] + 1] if eos else ids
            text, stopped = cut_at_stop(tok.decode(ids, skip_special_tokens=True), q.stop)
            reason = "stop" if (eos or stopped) else "length"
            if states is not None and not stopped:
                reason = states[b].finish_reason
            result.append(Completion(q.id, text, ids, reason, int(enc["attention_mask"][b].sum())))
        return result

    def _check_names(self, reqs: list[Request]) -> None:
        unknown = [q.adapter for q in reqs if q.adapter is not None and q.adapter not in self.adapters]
        if unknown:
            raise TunelabError(f"no adapter named {unknown[0]!r} is loaded (loaded: {', '.join(self.adapters)}).")

    def stream(self, request: Request) -> Iterator[str]:
        from transformers import TextIteratorStreamer

        self._check_names([request])
        tok = self.tokenizer
        model, context = self._model_for(request.adapter)
        enc = tok([chat_prompt(tok, request.prompt)], return_tensors="pt", add_special_tokens=False).to(model.device)
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(**enc, max_new_tokens=request.max_new_tokens, streamer=streamer,
                      pad_token_id=tok.pad_token_id, do_sample=request.temperature > 0)
        if request.temperature > 0:
            kwargs.update(temperature=request.temperature, top_p=request.top_p)
        if request.grammar is not None:
            kwargs["logits_processor"] = _grammar_processor([request], tok.pad_token_id)[1]
        if request.adapter is not None and request.adapter not in self._prompt:
            kwargs["adapter_names"] = [request.adapter]

        def run():
            with context, torch.inference_mode():
                model.generate(**kwargs)

        thread = Thread(target=run, daemon=True)
        thread.start()
        yield from streamer
        thread.join()


def _grammar_processor(reqs: list[Request], pad_token_id: int | None = None):
    """(per-row GrammarStates, a LogitsProcessorList running them): each row its own grammar, always finished
    within max_new_tokens. Greedy rows are vetted exactly (slack 0); sampled ones keep a reserve."""
    from transformers import LogitsProcessorList

    greedy = reqs[0].temperature == 0
    states = [GrammarState(q.grammar, q.max_new_tokens, **({"slack": 0} if greedy else {})) for q in reqs]
    return states, LogitsProcessorList([StructuredLogitsProcessor(states, vet=greedy, pad_token_id=pad_token_id)])
