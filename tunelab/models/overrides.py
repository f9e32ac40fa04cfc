"""What a recipe or a flag changes in a loaded model: the chat template and RoPE scaling.

`--chat-template FILE.jinja` (or recipe key `model.chat_template`) replaces the tokenizer's template;
`chatml` names the built-in ChatML template, tunelab's documented default for a base model that has none.
`model.rope_scaling: {type: linear | dynamic | yarn, factor: F}` sets transformers' `rope_parameters`
before the weights load, so the rotary embedding the model runs with is the scaled one.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import TunelabError

# ChatML as Qwen and SmolLM2 write it. After an assistant turn the tokenizer's EOS follows when it is not
# <|im_end|> itself (a base model's </s>), so generation still stops where a turn ends.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' }}"
    "{% if message['role'] == 'assistant' and eos_token and eos_token != '<|im_end|>' %}{{ eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BUILTIN_TEMPLATES = {"chatml": CHATML}
NO_TEMPLATE = ("has no chat template, so tunelab cannot turn conversations into its prompt format. Pass "
               "--chat-template FILE.jinja (recipe key model.chat_template) with the template the model was "
               "trained on, or --chat-template chatml to use ChatML (tunelab's default for base models).")
ROPE_TYPES = ("linear", "dynamic", "yarn")


def read_chat_template(value: str) -> str:
    """The Jinja text `value` names: a built-in name (chatml) or a template file."""
    if value.lower() in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[value.lower()]
    path = Path(value).expanduser()
    if not path.is_file():
        raise TunelabError(f"--chat-template {value!r}: no such file, and not a built-in template "
                           f"({', '.join(BUILTIN_TEMPLATES)}); give a .jinja file or chatml.")
    text = path.read_text(encoding="utf-8")
    if "messages" not in text:
        raise TunelabError(f"{path}: this does not look like a chat template (it never reads `messages`); "
                           "see https://huggingface.co/docs/transformers/chat_templating.")
    return text


def set_chat_template(tokenizer, value: str | None):
    """Replace `tokenizer`'s chat template with the one `value` names (None: keep the model's own)."""
    if value:
        tokenizer.chat_template = read_chat_template(value)
    return tokenizer


def require_chat_template(tokenizer) -> None:
    """A TunelabError naming --chat-template when `tokenizer` has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise TunelabError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} {NO_TEMPLATE}")


def apply_rope_scaling(config, kind: str, factor: float):
    """Set `config.rope_parameters` to `kind` RoPE scaling by `factor` (validated by transformers)."""
    if kind not in ROPE_TYPES:
        raise TunelabError(f"model.rope_scaling.type={kind!r}: use one of {', '.join(ROPE_TYPES)}.")
    if not getattr(config, "rope_parameters", None) and not hasattr(config, "rope_theta"):
        raise TunelabError(f"model.rope_scaling: {type(config).__name__} has no rotary position embedding.")
    old = dict(config.rope_parameters or {})
    params = {"rope_type": kind, "factor": float(factor),
              "rope_theta": old.get("rope_theta", getattr(config, "rope_theta", None) or config.default_theta)}
    if kind == "yarn":  # the pretraining context the factor stretches
        params["original_max_position_embeddings"] = old.get("original_max_position_embeddings",
                                                             config.max_position_embeddings)
    config.rope_parameters = params
    config.validate_rope()
    return config
