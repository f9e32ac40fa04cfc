"""Rerankers: rescore a query's retrieved candidates with a local cross-encoder, or the base model as a judge.

A reranker reads each (query, passage) pair whole, which the retrievers cannot afford over a whole corpus, so
it runs on the top `depth` fused candidates only. Two kinds:
- `CrossEncoderReranker`: a sentence-transformers cross-encoder from a local folder (nothing is downloaded).
- `JudgeReranker`: the base causal LM asked, per pair, whether the passage answers the question; the score is
  the log-odds of "Yes" against "No" at its first answer token (one forward pass per pair, in padded batches).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from tunelab.errors import TunelabError
from tunelab.infer.api import chat_prompt
from tunelab.rag.embed import weights_sha256

JUDGE_DEPTH = 10  # fused candidates the judge rescores: its cost is one forward pass each
# the question before the passage: on 24 handbook-qa questions the bundled SmolLM2-135M put the gold passage
# first for 14 this way, 11 with the passage first (the fused order: 24)
JUDGE_SYSTEM = "You are a careful assistant."
JUDGE_USER = ("Question: {query}\n\nPassage:\n{passage}\n\nDoes this passage contain the answer to the question? "
              "Answer Yes or No.")
YES, NO = ("Yes", "yes", " Yes", " yes"), ("No", "no", " No", " no")


class Reranker(Protocol):
    """Scores (query, passage) pairs, higher = more relevant; `name` labels its scores, `identity` is what an
    index or an eval records, `depth` how many fused candidates it rescores (None: all of them)."""

    name: str
    identity: dict
    depth: int | None

    def score(self, pairs: list[tuple[str, str]]) -> list[float]: ...


class CrossEncoderReranker:
    """A local cross-encoder folder (sentence-transformers' CrossEncoder) that rescores every fused candidate."""

    name = "cross-encoder"
    depth = None

    def __init__(self, path: str | Path):
        from sentence_transformers import CrossEncoder

        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise TunelabError(f"reranker {str(path)!r} is not a local cross-encoder folder (no config.json); "
                               "give a folder saved by CrossEncoder.save() or save_pretrained().")
        self.identity = {"path": str(folder.resolve()), "sha256": weights_sha256(folder)}  # as indexes record it
        self.model = CrossEncoder(str(folder), device="cpu", local_files_only=True)

    def score(self, pairs: list[tuple[str, str]]) -> list[float]:
        if not pairs:
            return []
        return [float(s) for s in self.model.predict(list(pairs), show_progress_bar=False)]


def _token_ids(tokenizer, words: tuple[str, ...]) -> list[int]:
    """The first token of each spelling that is one token (the judge's answer starts with one of them)."""
    ids = {tokenizer.encode(w, add_special_tokens=False)[0] for w in words
           if len(tokenizer.encode(w, add_special_tokens=False)) == 1}
    if not ids:
        raise TunelabError(f"the judge's tokenizer has no single token for {words[0]!r}; use a cross-encoder "
                           "(--reranker FOLDER) with this model.")
    return sorted(ids)


class JudgeReranker:
    """The base model as a pointwise relevance judge: score = log P(yes) - log P(no) of its first answer token.

    model / tokenizer: a transformers causal LM and its chat tokenizer (an engine's `model` and `tokenizer`).
    depth: fused candidates rescored per query. batch_size: pairs per forward pass (left-padded).
    """

    name = "judge"

    def __init__(self, model, tokenizer, depth: int = JUDGE_DEPTH, batch_size: int = 16, label: str = "base"):
        if depth < 1:
            raise TunelabError(f"judge depth {depth}: rescore at least one candidate per query.")
        self.model, self.tokenizer, self.depth, self.batch_size = model, tokenizer, depth, batch_size
        self.yes, self.no = _token_ids(tokenizer, YES), _token_ids(tokenizer, NO)
        self.identity = {"kind": self.name, "model": label, "depth": depth}

    @classmethod
    def from_engine(cls, engine, depth: int = JUDGE_DEPTH) -> JudgeReranker:
        """The judge on a loaded engine's base weights (its public `model` and `tokenizer`)."""
        model = getattr(engine, "model", None)
        if model is None or not callable(model):
            raise TunelabError(f"{type(engine).__name__} exposes no transformers model to judge relevance with; "
                               "rerank with a local cross-encoder instead (--reranker FOLDER).")
        if engine.adapters:  # the batched engine's layers may still route rows through an adapter
            raise TunelabError(f"the engine has adapters loaded ({', '.join(engine.adapters)}): judge relevance "
                               "before adding them, or on an engine of the base model.")
        return cls(model, engine.tokenizer, depth, label=str(getattr(engine, "spec", "base")))

    def prompt_ids(self, query: str, passage: str) -> list[int]:
        msgs = [{"role": "system", "content": JUDGE_SYSTEM},
                {"role": "user", "content": JUDGE_USER.format(passage=passage.strip(), query=query.strip())}]
        return self.tokenizer(chat_prompt(self.tokenizer, msgs), add_special_tokens=False)["input_ids"]

    def score(self, pairs: list[tuple[str, str]]) -> list[float]:
        ids = [self.prompt_ids(q, p) for q, p in pairs]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch: little padding
        out = [0.0] * len(ids)
        for s in range(0, len(order), self.batch_size):
            batch = order[s:s + self.batch_size]
            for i, v in zip(batch, self._log_odds([ids[i] for i in batch])):
                out[i] = v
        return out

    def _log_odds(self, rows: list[list[int]]) -> list[float]:
        import torch

        device = next(self.model.parameters()).device
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)  # (B, T), left-padded: every row ends at T - 1
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, width - len(r):] = torch.tensor(r)
            mask[b, width - len(r):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # positions count real tokens only, as generate() does
        with torch.inference_mode():
            logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                position_ids=pos.to(device), logits_to_keep=1).logits[:, -1].float()  # (B, V)
        yes = torch.logsumexp(logits[:, self.yes], -1)  # (B,)
        no = torch.logsumexp(logits[:, self.no], -1)
        return (yes - no).tolist()


def load_reranker(spec: str | Path | Reranker | None, engine=None, depth: int = JUDGE_DEPTH) -> Reranker | None:
    """A reranker from a spec: a cross-encoder folder; "judge" = the base model of `engine` as a judge; a
    Reranker (returned as it is); None."""
    if spec is None or hasattr(spec, "score"):
        return spec
    if str(spec) == "judge":
        if engine is None:
            raise TunelabError("reranker 'judge' needs a loaded model to judge with; give a cross-encoder folder.")
        return JudgeReranker.from_engine(engine, depth)
    return CrossEncoderReranker(spec)
