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
from tunelab.runs import layout


@dataclass
class Engine:
    """A loaded base model, its tokenizer, and the adapter names attached to it (empty for the base)."""

    model: object
    tokenizer: object
    adapters: list[str]


def _check_adapter(adapter: Path, base_spec: str, base_config) -> None:
    cfg_path = adapter / layout.ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise TunelabError(f"{adapter} is not a PEFT adapter folder (no {layout.ADAPTER_CONFIG}).")
    cfg = json.loads(cfg_path.read_text())
    run = adapter / layout.RUN_JSON
    if run.is_file():
        trained = layout.read_run_json(adapter).get("base_model") or {}
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


@torch.inference_mode()
def generate_batch(engine: Engine, conversations: list[list[dict]], max_new_tokens: int = 256,
                   stop: list[str] = (), adapter_names: list[str] | None = None,
                   logits_processor=None) -> list[str]:
    """Greedy-decode one batch of chat conversations (left-padded). `adapter_names[i]` picks the adapter
    for row i ("__base__" for none): PEFT's mixed-adapter batches."""
    tok, model = engine.tokenizer, engine.model
    enc = tok(chat_prompts(tok, conversations), return_tensors="pt", padding=True, add_special_tokens=False)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                  eos_token_id=tok.eos_token_id)
    if stop:
        kwargs.update(stop_strings=list(stop), tokenizer=tok)
    if logits_processor is not None:
        kwargs["logits_processor"] = logits_processor
    if adapter_names is not None:
        kwargs["adapter_names"] = adapter_names
    out = model.generate(**enc.to(model.device), **kwargs)  # (B, T_prompt + new)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return [_cut_at_stop(t, list(stop)).strip() for t in texts]


def stream(engine: Engine, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.0,
           logits_processor=None) -> Iterator[str]:
    """Yield text pieces as they are generated (greedy when temperature is 0)."""
    from transformers import TextIteratorStreamer

    tok, model = engine.tokenizer, engine.model
    enc = tok(chat_prompts(tok, [messages]), return_tensors="pt", add_special_tokens=False).to(model.device)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(**enc, max_new_tokens=max_new_tokens, streamer=streamer, pad_token_id=tok.pad_token_id,
                  do_sample=temperature > 0)
    if temperature > 0:
        kwargs["temperature"] = temperature
    if logits_processor is not None:
        kwargs["logits_processor"] = logits_processor
    thread = Thread(target=lambda: torch.inference_mode()(model.generate)(**kwargs), daemon=True)
    thread.start()
    yield from streamer
    thread.join()
