"""Generation engine: load a base model with zero or more adapters; batched, greedy, stop strings, streaming."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from threading import Thread

import torch

from tunelab.errors import TunelabError
from tunelab.models import load_model, same_model


@dataclass
class Engine:
    """A loaded base model, its tokenizer, and the adapter names attached to it (empty for the base)."""

    model: object
    tokenizer: object
    adapters: list[str]


def _check_adapter(adapter: Path, base_spec: str, base_config) -> None:
    cfg_path = adapter / "adapter_config.json"
    if not cfg_path.is_file():
        raise TunelabError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json).")
    cfg = json.loads(cfg_path.read_text())
    run = adapter / "run.json"
    if run.is_file():
        try:
            trained = json.loads(run.read_text()).get("base_model") or {}
        except ValueError:
            raise TunelabError(f"{run} is not valid JSON; fix or delete it.") from None
        if same_model(trained, base_spec) is False:
            spec = trained.get("spec") or trained.get("path") or trained.get("hub_id")
            raise TunelabError(f"adapter {adapter} was trained on {spec!r} ({run}), not {base_spec!r}; "
                               f"evaluate it with --model {spec}.")
    hidden = getattr(base_config, "hidden_size", None)
    if cfg.get("peft_type") == "PROMPT_TUNING" and hidden and cfg.get("token_dim") not in (None, hidden):
        raise TunelabError(f"adapter {adapter} expects hidden size {cfg['token_dim']}, the base has {hidden}.")


def load_engine(spec: str, adapters: list[str | Path] = (), dtype: str = "auto") -> Engine:
    """Load `spec` and attach each adapter folder under its own name (adapter-1, adapter-2, ...)."""
    model, tok = load_model(spec, dtype=dtype)
    tok.padding_side = "left"
    names: list[str] = []
    if adapters:
        from peft import PeftModel

        for i, a in enumerate(adapters):
            path = Path(a)
            _check_adapter(path, spec, model.config)
            name = f"adapter-{i + 1}"
            try:
                if i == 0:
                    model = PeftModel.from_pretrained(model, str(path), adapter_name=name)
                else:
                    model.load_adapter(str(path), adapter_name=name)
            except (RuntimeError, ValueError, KeyError) as e:
                raise TunelabError(f"adapter {path} does not fit base model {spec!r}: {e}") from None
            names.append(name)
        model.eval()
    return Engine(model, tok, names)


def chat_prompts(tokenizer, conversations: list[list[dict]]) -> list[str]:
    return [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in conversations]


def _cut_at_stop(text: str, stop: list[str]) -> str:
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


@dataclass
class Answer:
    """One generated answer: text, why it ended ("stop", "length", or "length_closed": steered to a complete
    document before the budget ran out), generated tokens, and the structured-output closer's cost."""

    text: str
    finish_reason: str
    tokens: int
    closer_seconds: float = 0.0


@torch.inference_mode()
def _generate(engine: Engine, conversations: list[list[dict]], max_new_tokens: int, stop: list[str],
              adapter_names: list[str] | None, logits_processor, eos_ids: list[int] | None = None):
    """(texts, new ids (B, T_new)) of one greedy, left-padded batch."""
    tok, model = engine.tokenizer, engine.model
    enc = tok(chat_prompts(tok, conversations), return_tensors="pt", padding=True, add_special_tokens=False)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                  eos_token_id=eos_ids or tok.eos_token_id)
    if stop:
        kwargs.update(stop_strings=list(stop), tokenizer=tok)
    if logits_processor is not None:
        kwargs["logits_processor"] = logits_processor
    if adapter_names is not None:
        kwargs["adapter_names"] = adapter_names
    out = model.generate(**enc.to(model.device), **kwargs)  # (B, T_prompt + new)
    new = out[:, enc["input_ids"].shape[1]:]
    texts = tok.batch_decode(new, skip_special_tokens=True)
    return [_cut_at_stop(t, list(stop)).strip() for t in texts], new


def generate_batch(engine: Engine, conversations: list[list[dict]], max_new_tokens: int = 256,
                   stop: list[str] = (), adapter_names: list[str] | None = None,
                   logits_processor=None) -> list[str]:
    """Greedy-decode one batch of chat conversations (left-padded). `adapter_names[i]` picks the adapter
    for row i ("__base__" for none): PEFT's mixed-adapter batches."""
    return _generate(engine, conversations, max_new_tokens, stop, adapter_names, logits_processor)[0]


def _count_tokens(new_ids, eos: set[int]) -> list[int]:
    """Generated tokens per row: up to and including the first EOS (all of them when none)."""
    counts = []
    for row in new_ids.tolist():
        hit = next((i for i, t in enumerate(row) if t in eos), None)
        counts.append(len(row) if hit is None else hit + 1)
    return counts


def generate_answers(engine: Engine, conversations: list[list[dict]], max_new_tokens: int = 256,
                     stop: list[str] = (), adapter_names: list[str] | None = None,
                     grammars: list | None = None) -> list[Answer]:
    """Like generate_batch, with why each answer ended. `grammars[i]` (a compiled grammar from
    tunelab.infer.grammar.compile_grammar, or None for the whole batch unconstrained) constrains row i so
    that it always ends as a complete document within max_new_tokens when one fits (GrammarState)."""
    eos = {engine.tokenizer.eos_token_id}
    if grammars is None:
        texts, new = _generate(engine, conversations, max_new_tokens, stop, adapter_names, None)
        counts = _count_tokens(new, eos)
        return [Answer(t, "stop" if n < new.shape[1] or (n and new[i, n - 1].item() in eos) else "length", n)
                for i, (t, n) in enumerate(zip(texts, counts))]
    from transformers import LogitsProcessorList

    from tunelab.infer.structured import GrammarState, StructuredLogitsProcessor

    if len(grammars) != len(conversations):
        raise TunelabError(f"{len(grammars)} grammars for {len(conversations)} conversations: give one per row.")
    states = [GrammarState(g, max_new_tokens, slack=0) for g in grammars]  # exact: every pick is vetted
    proc = StructuredLogitsProcessor(states, vet=True, pad_token_id=engine.tokenizer.pad_token_id)
    eos |= {s.matcher.stop_token_ids[0] for s in states}
    texts, new = _generate(engine, conversations, max_new_tokens, stop, adapter_names, LogitsProcessorList([proc]),
                           sorted(eos))
    reasons = proc.finish(new)
    return [Answer(t, r, n, s.closer_seconds)
            for t, r, n, s in zip(texts, reasons, _count_tokens(new, eos), states)]


def stream(engine: Engine, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.0,
           logits_processor=None, grammar=None) -> Iterator[str]:
    """Yield text pieces as they are generated (greedy when temperature is 0). `grammar` (a compiled
    grammar) constrains the answer to a document that is complete within max_new_tokens (GrammarState;
    exact when greedy, with GROWTH tokens held in reserve when sampling)."""
    from transformers import LogitsProcessorList, TextIteratorStreamer

    tok, model = engine.tokenizer, engine.model
    enc = tok(chat_prompts(tok, [messages]), return_tensors="pt", add_special_tokens=False).to(model.device)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(**enc, max_new_tokens=max_new_tokens, streamer=streamer, pad_token_id=tok.pad_token_id,
                  do_sample=temperature > 0)
    if temperature > 0:
        kwargs["temperature"] = temperature
    if grammar is not None:
        from tunelab.infer.structured import GROWTH, GrammarState, StructuredLogitsProcessor

        state = GrammarState(grammar, max_new_tokens, slack=GROWTH if temperature > 0 else 0)
        logits_processor = LogitsProcessorList([StructuredLogitsProcessor([state], vet=temperature == 0,
                                                                          pad_token_id=tok.pad_token_id)])
        kwargs["eos_token_id"] = sorted({tok.eos_token_id, state.matcher.stop_token_ids[0]})
    if logits_processor is not None:
        kwargs["logits_processor"] = logits_processor
    thread = Thread(target=lambda: torch.inference_mode()(model.generate)(**kwargs), daemon=True)
    thread.start()
    yield from streamer
    thread.join()
