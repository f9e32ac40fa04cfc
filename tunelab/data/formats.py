"""The four JSONL row formats people bring (chat, prompt/completion, alpaca, sharegpt) -> chat messages.

Each format is detected from a row's keys and normalised to a list of `{"role", "content"}` dicts:

- ``chat``: ``{"messages": [{"role": "user", "content": "..."}, ...]}`` (OpenAI / TRL conversational)
- ``prompt-completion``: ``{"prompt": "...", "completion": "..."}`` (either side may also be a message list)
- ``alpaca``: ``{"instruction": "...", "input": "...", "output": "...", "system": "..."}`` (input, system optional)
- ``sharegpt``: ``{"conversations": [{"from": "human" | "gpt" | "system", "value": "..."}, ...]}``

Normalisers raise `RowError` (a plain message); the reader adds `file:line` and turns it into a TunelabError.
"""

from __future__ import annotations

from collections.abc import Callable

Messages = list[dict[str, str]]

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "tool": "tool"}

# format name -> the keys that identify it (all must be present); checked in this order
SIGNATURES: dict[str, tuple[str, ...]] = {
    "chat": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt-completion": ("prompt", "completion"),
}

ACCEPTED = (
    '`{"messages": [{"role": ..., "content": ...}]}` (chat), `{"prompt": ..., "completion": ...}` '
    '(prompt-completion), `{"instruction": ..., "input": ..., "output": ...}` (alpaca) or '
    '`{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}` (sharegpt)'
)


class RowError(ValueError):
    """A row does not fit its format; the message says what is wrong and how to fix it."""


def detect_format(row: dict) -> str | None:
    """The format whose identifying keys `row` has (see SIGNATURES), or None."""
    for name, keys in SIGNATURES.items():
        if all(k in row for k in keys):
            return name
    return None


def _text(value, field: str, allow_empty: bool = True) -> str:
    """A string field; OpenAI-style content parts (`[{"type": "text", "text": ...}]`) are joined."""
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        value = "".join(str(p.get("text", "")) for p in value)
    if value is None:
        raise RowError(f"field {field!r} is null; give it a string")
    if not isinstance(value, str):
        raise RowError(f"field {field!r} must be a string, got {type(value).__name__} ({str(value)[:40]!r})")
    if not allow_empty and not value.strip():
        raise RowError(f"field {field!r} is empty; give it some text or remove the row")
    return value


def _require(row: dict, key: str, fmt: str):
    if key not in row:
        raise RowError(f"{fmt} row is missing {key!r} (its keys: {sorted(row)}); add it or remove the row")
    return row[key]


def _check_conversation(messages: Messages, field: str) -> Messages:
    if not messages:
        raise RowError(f"field {field!r} is an empty list; give at least a user and an assistant message")
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError(
            f"field {field!r} has no assistant message, so there is nothing to learn; "
            "end the conversation with the reply you want the model to give"
        )
    if all(not m["content"].strip() for m in messages if m["role"] != "assistant"):
        raise RowError(f"field {field!r} has no prompt text (every non-assistant message is empty)")
    return messages


def _message_list(value, field: str) -> Messages:
    if not isinstance(value, list):
        raise RowError(f"field {field!r} must be a list of {{role, content}} objects, got {type(value).__name__}")
    out: Messages = []
    for i, m in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise RowError(f"{where} must be an object with 'role' and 'content', got {type(m).__name__}")
        if "role" not in m or "content" not in m:
            raise RowError(f"{where} is missing {'role' if 'role' not in m else 'content'!r} (its keys: {sorted(m)})")
        role = m["role"]
        if role not in ROLES:
            raise RowError(f"{where} has role {role!r}; use one of {', '.join(ROLES)}")
        out.append({"role": role, "content": _text(m["content"], f"{where}.content")})
    return out


def _chat(row: dict) -> Messages:
    return _check_conversation(_message_list(_require(row, "messages", "chat"), "messages"), "messages")


def _prompt_completion(row: dict) -> Messages:
    prompt, completion = _require(row, "prompt", "prompt-completion"), _require(row, "completion", "prompt-completion")
    if isinstance(prompt, list):  # TRL's conversational prompt-completion
        head = _message_list(prompt, "prompt")
    else:
        head = [{"role": "user", "content": _text(prompt, "prompt", allow_empty=False)}]
    if isinstance(completion, list):
        tail = _message_list(completion, "completion")
    else:
        tail = [{"role": "assistant", "content": _text(completion, "completion")}]
    return _check_conversation(head + tail, "completion")


def _alpaca(row: dict) -> Messages:
    instruction = _text(_require(row, "instruction", "alpaca"), "instruction")
    extra = _text(row.get("input") or "", "input")
    output = _text(_require(row, "output", "alpaca"), "output")
    if not instruction.strip() and not extra.strip():
        raise RowError("fields 'instruction' and 'input' are both empty; give the model a prompt")
    user = f"{instruction}\n\n{extra}" if instruction.strip() and extra.strip() else (instruction or extra)
    messages: Messages = []
    if row.get("system"):
        messages.append({"role": "system", "content": _text(row["system"], "system")})
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return messages


def _sharegpt(row: dict) -> Messages:
    turns = _require(row, "conversations", "sharegpt")
    if not isinstance(turns, list):
        raise RowError(f"field 'conversations' must be a list of {{from, value}} objects, got {type(turns).__name__}")
    out: Messages = []
    for i, t in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            got = sorted(t) if isinstance(t, dict) else type(t).__name__
            raise RowError(f"{where} must be an object with 'from' and 'value' (got {got})")
        role = SHAREGPT_ROLES.get(t["from"])
        if role is None:
            raise RowError(f"{where} has from={t['from']!r}; use human, gpt or system")
        out.append({"role": role, "content": _text(t["value"], f"{where}.value")})
    return _check_conversation(out, "conversations")


NORMALISERS: dict[str, Callable[[dict], Messages]] = {
    "chat": _chat, "prompt-completion": _prompt_completion, "alpaca": _alpaca, "sharegpt": _sharegpt,
}


def to_messages(row: dict, fmt: str) -> Messages:
    """Normalise one row of format `fmt` to chat messages; raises RowError when it does not fit."""
    return NORMALISERS[fmt](row)


def prompt_messages(row: dict) -> Messages:
    """The prompt of a row that awaits its answer (distillation inputs): `messages` (a trailing assistant
    turn, if any, is dropped) or `prompt` (text or a message list); raises RowError when it has neither."""
    if "messages" in row:
        messages = _message_list(row["messages"], "messages")
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
    elif "prompt" in row:
        prompt = row["prompt"]
        messages = (_message_list(prompt, "prompt") if isinstance(prompt, list)
                    else [{"role": "user", "content": _text(prompt, "prompt", allow_empty=False)}])
    else:
        raise RowError(f"the row has neither 'messages' nor 'prompt' (its keys: {sorted(row)}); give the "
                       "conversation to answer as messages, or a prompt string")
    if not any(m["role"] == "user" and m["content"].strip() for m in messages):
        raise RowError("the row has no user message with text to answer")
    return messages
