"""Tokenise chat conversations with the model's chat template and a loss weight for every token.

Weight convention (used by packing and the loss too): ``weights[t]`` is the weight of *predicting*
``input_ids[t]`` from position ``t - 1``. Response tokens (an assistant message's content and the
end-of-turn token that closes it, e.g. ``<|im_end|>``) get 1.0; everything else (system and user
messages, role headers, the template's newlines) gets ``prompt_loss_weight``. ``weights[0]`` is always 0:
nothing precedes the first token of an example.

Assistant spans are found by rendering the template incrementally: the text of
``messages[:i]`` with the generation prompt ends where assistant message ``i`` starts, and the text of
``messages[:i+1]`` contains it. Each piece (prompt / response) is tokenised on its own, so the prompt
tokens are exactly the tokens the model sees at generation time. Templates with ``{% generation %}``
blocks use transformers' ``return_assistant_tokens_mask`` instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tunelab.errors import TunelabError
from tunelab.models.overrides import require_chat_template

Messages = list[dict[str, str]]

# end-of-turn tokens of common chat templates; the tokenizer's eos token is always included
_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


@dataclass
class Example:
    """One tokenised conversation: token ids and the loss weight of predicting each of them."""

    input_ids: list[int]
    weights: list[float]  # weights[t]: weight of predicting input_ids[t] from t-1; weights[0] == 0
    truncated: bool = False
    index: int = -1  # the row it came from

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class TokenizeStats:
    """What tokenisation did to a dataset: kept, truncated and dropped rows, token counts."""

    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0  # too_long="drop"
    dropped_no_response: int = 0  # truncation cut away every response token
    tokens: int = 0
    response_tokens: int = 0
    max_length: int | None = None

    def summary(self) -> str:
        """One line for logs, e.g. `1000 rows -> 998 examples (12 truncated to 512 tokens, 2 dropped ...)`."""
        parts = []
        if self.truncated:
            parts.append(f"{self.truncated} truncated to {self.max_length} tokens")
        if self.dropped_too_long:
            parts.append(f"{self.dropped_too_long} dropped as longer than {self.max_length} tokens")
        if self.dropped_no_response:
            parts.append(f"{self.dropped_no_response} dropped: truncation left no response tokens")
        extra = f" ({', '.join(parts)})" if parts else ""
        return (f"{self.rows} rows -> {self.kept} examples{extra}; {self.tokens} tokens, "
                f"{self.response_tokens} of them response tokens")


class ChatTokenizer:
    """A tokenizer plus what we learn once about its chat template (end tokens, generation tags)."""

    def __init__(self, tokenizer):
        require_chat_template(tokenizer)
        self.tok = tokenizer
        vocab = tokenizer.get_added_vocab()  # end-of-turn tokens are always added (special) tokens
        ends = [tokenizer.eos_token] if tokenizer.eos_token else []
        self.end_tokens = ends + [t for t in _END_TOKENS if t in vocab and t not in ends]
        self.generation_tags = bool(_GENERATION_TAG.search(tokenizer.chat_template))

    def render(self, messages: Messages, generation_prompt: bool = False) -> str:
        try:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja's TemplateError from `raise_exception(...)` in the template, and others
            raise TunelabError(
                f"the chat template rejected the conversation ({type(e).__name__}: {e}); many templates "
                "require roles to alternate user/assistant, optionally after one system message."
            ) from None

    def _response_end(self, turn: str, start: int, content: str) -> int:
        """Where the response starting at `start` ends in `turn`: just after its end-of-turn token."""
        text = content.strip()
        found = turn.find(text, start) if text else -1
        after = found + len(text) if found >= 0 else start
        hits = [(j, len(t)) for t in self.end_tokens if (j := turn.find(t, after)) >= 0]
        if not hits:  # no end token rendered: the whole rest of the turn is what the model must produce
            return len(turn)
        j, n = min(hits)
        return j + n

    def segments(self, messages: Messages) -> list[tuple[str, bool]]:
        """Split the rendered conversation into `(text, is_response)` pieces whose concatenation is the whole."""
        full = self.render(messages)
        pieces: list[tuple[str, bool]] = []
        pos = 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            head = self.render(messages[:i], generation_prompt=True) if i else ""
            turn = self.render(messages[: i + 1])
            if i == 0 or not (turn.startswith(head) and full.startswith(turn)) or len(head) < pos:
                raise TunelabError(
                    f"the chat template of {getattr(self.tok, 'name_or_path', 'this model')!r} does not render "
                    f"conversations incrementally (rendering messages[:{i}] plus the generation prompt is not a "
                    f"prefix of rendering messages[:{i + 1}]), so tunelab cannot find assistant message {i}'s "
                    "tokens. Start conversations with a system or user message; if they do, the template "
                    "rewrites earlier turns: add `{% generation %}` blocks to it so transformers can mark them."
                )
            end = self._response_end(turn, len(head), m["content"])
            pieces += [(full[pos:len(head)], False), (full[len(head):end], True)]
            pos = end
        pieces.append((full[pos:], False))
        return [(text, resp) for text, resp in pieces if text]

    def encode(self, conversations: Sequence[Messages]) -> list[tuple[list[int], list[bool]]]:
        """Token ids and a response mask per conversation (batched through the fast tokenizer)."""
        if self.generation_tags:
            out = []
            for messages in conversations:
                enc = self.tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                   return_assistant_tokens_mask=True)
                out.append((list(enc["input_ids"]), [bool(b) for b in enc["assistant_masks"]]))
            return out
        per_conv = []
        for k, messages in enumerate(conversations):
            try:
                per_conv.append(self.segments(messages))
            except TunelabError as e:
                raise TunelabError(f"conversation {k}: {e}") from None
        flat = [text for pieces in per_conv for text, _ in pieces]
        ids = self.tok(flat, add_special_tokens=False)["input_ids"] if flat else []
        out, k = [], 0
        for pieces in per_conv:
            tokens: list[int] = []
            mask: list[bool] = []
            for _, resp in pieces:
                tokens += ids[k]
                mask += [resp] * len(ids[k])
                k += 1
            out.append((tokens, mask))
        return out


def _example(ids: list[int], mask: list[bool], prompt_loss_weight: float, max_length: int | None,
             too_long: str, index: int, stats: TokenizeStats) -> Example | None:
    stats.rows += 1
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        if too_long == "drop":
            stats.dropped_too_long += 1
            return None
        ids, mask = ids[:max_length], mask[:max_length]
    n_resp = sum(mask[1:])
    if n_resp == 0:
        stats.dropped_no_response += 1
        return None
    weights = [1.0 if m else prompt_loss_weight for m in mask]
    weights[0] = 0.0
    stats.kept += 1
    stats.truncated += truncated
    stats.tokens += len(ids)
    stats.response_tokens += n_resp
    return Example(ids, weights, truncated, index)


def _check_args(prompt_loss_weight: float, too_long: str) -> None:
    if not 0.0 <= prompt_loss_weight <= 1.0:
        raise TunelabError(f"prompt_loss_weight={prompt_loss_weight} must be between 0 and 1 (0 masks prompts).")
    if too_long not in ("truncate", "drop"):
        raise TunelabError(f"too_long={too_long!r}: use 'truncate' or 'drop'.")


def tokenize_chat(tokenizer, messages: Messages, prompt_loss_weight: float, max_length: int | None,
                  too_long: str = "truncate") -> Example | None:
    """Tokenise one conversation with per-token loss weights.

    Args:
        tokenizer: a transformers tokenizer with a chat template.
        messages: `[{"role", "content"}, ...]` with at least one assistant message.
        prompt_loss_weight: weight of non-response tokens (0 masks them; 1 trains on everything).
        max_length: longest example in tokens (None: no limit).
        too_long: "truncate" keeps the first `max_length` tokens; "drop" returns None.

    Returns the Example, or None when it was dropped (too long, or truncation removed every response token).
    """
    _check_args(prompt_loss_weight, too_long)
    (ids, mask), = ChatTokenizer(tokenizer).encode([messages])
    return _example(ids, mask, prompt_loss_weight, max_length, too_long, 0, TokenizeStats())


def tokenize_dataset(tokenizer, rows: Iterable[Messages], prompt_loss_weight: float, max_length: int | None,
                     too_long: str = "truncate") -> tuple[list[Example], TokenizeStats]:
    """Tokenise many conversations (see `tokenize_chat`); returns the kept examples and what happened.

    `Example.index` is the position of each kept example in `rows`.
    """
    _check_args(prompt_loss_weight, too_long)
    rows = list(rows)
    stats = TokenizeStats(max_length=max_length)
    examples = []
    for index, (ids, mask) in enumerate(ChatTokenizer(tokenizer).encode(rows)):
        ex = _example(ids, mask, prompt_loss_weight, max_length, too_long, index, stats)
        if ex is not None:
            examples.append(ex)
    return examples, stats
