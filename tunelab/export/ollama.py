"""An Ollama Modelfile beside a GGUF: FROM, ADAPTER (LoRA GGUF), TEMPLATE from a ChatML chat template, stops."""

from __future__ import annotations

from pathlib import Path

# Ollama templates are Go templates, not Jinja: ChatML (SmolLM2, Qwen, ...) is translated; for other
# templates Ollama reads tokenizer.chat_template from the GGUF and matches it to one it knows.
CHATML = ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
          '<|im_start|>assistant\n')


def modelfile(gguf_name: str, chat_template: str | None, stop: list[str], adapter: str | None = None) -> str:
    """The text of a Modelfile for `gguf_name` (a path relative to the Modelfile's folder)."""
    lines = [f"FROM ./{gguf_name}" if adapter is None else f"FROM {gguf_name}"]
    if adapter is not None:
        lines.append(f"ADAPTER ./{adapter}")
    if chat_template and "<|im_start|>" in chat_template:
        lines.append(f'TEMPLATE """{CHATML}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stop if s]
    return "\n".join(lines) + "\n"


def write_modelfile(folder: Path, gguf_name: str, tokenizer, adapter: str | None = None) -> Path:
    """Write `Modelfile` into `folder`; stops are the tokenizer's eos (and <|im_end|> for ChatML)."""
    template = getattr(tokenizer, "chat_template", None)
    stop = [tokenizer.eos_token] + (["<|im_end|>"] if template and "<|im_end|>" in template else [])
    path = Path(folder) / "Modelfile"
    path.write_text(modelfile(gguf_name, template, list(dict.fromkeys(stop)), adapter), encoding="utf-8")
    return path
