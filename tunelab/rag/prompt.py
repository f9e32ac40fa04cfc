"""The one template that puts retrieved passages into a prompt (`tunelab eval --rag`, `generate --rag`).

The passages go before the question in the (last) user turn, numbered, each under its title:

    Context:
    [1] People directory: Tariq Novak
    Tariq Novak joined Quillmark Systems on ...

    [2] ...

    <the question>

The system prompt and earlier turns are left as they are, so a task's instructions still apply.
"""

from __future__ import annotations

from typing import TypeVar

PASSAGE = "[{n}] {title}\n{text}"
TEMPLATE = "Context:\n{passages}\n\n{question}"

P = TypeVar("P", str, list)


def format_passages(hits) -> str:
    """The numbered passages of `hits` (objects with .title and .text), best first."""
    return "\n\n".join(PASSAGE.format(n=i, title=h.title or "(untitled)", text=h.text.strip())
                       for i, h in enumerate(hits, 1))


def with_passages(messages_or_prompt: P, hits) -> P:
    """`messages_or_prompt` with the passages of `hits` inserted by TEMPLATE: a prompt string becomes the
    filled template; a chat (list of {"role", "content"}) gets it in its last user turn (a new list)."""
    if not hits:
        return messages_or_prompt
    passages = format_passages(hits)
    if isinstance(messages_or_prompt, str):
        return TEMPLATE.format(passages=passages, question=messages_or_prompt)
    msgs = [dict(m) for m in messages_or_prompt]
    last = max((i for i, m in enumerate(msgs) if m.get("role") == "user"), default=None)
    if last is None:
        msgs.append({"role": "user", "content": TEMPLATE.format(passages=passages, question="").rstrip()})
    else:
        msgs[last]["content"] = TEMPLATE.format(passages=passages, question=msgs[last]["content"])
    return msgs
