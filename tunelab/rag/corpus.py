"""Read a corpus (JSONL, a folder of .md/.txt files, or a task's corpus) and cut it into token windows."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tunelab.errors import TunelabError

TEXT_SUFFIXES = (".md", ".txt")


@dataclass(frozen=True)
class Doc:
    id: str
    text: str
    title: str = ""
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Chunk:
    """A window of one document: `id` is "<doc_id>#<n>"; `text` is an exact slice of the document."""

    id: str
    doc_id: str
    text: str
    title: str = ""
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def indexed_text(self) -> str:
        """What BM25 and the embedder see: the title (it often names the subject) then the passage."""
        return f"{self.title}\n{self.text}" if self.title else self.text


def _read_jsonl(path: Path) -> list[Doc]:
    docs = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TunelabError(f"{path}:{lineno}: malformed JSON ({e.msg}); one document per line.") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or "id" not in row:
            raise TunelabError(f"{path}:{lineno}: a corpus row needs `id` and `text` (a string), optionally "
                               "`title` and other metadata fields.")
        meta = {k: v for k, v in row.items() if k not in ("id", "text", "title")}
        docs.append(Doc(str(row["id"]), row["text"], str(row.get("title") or ""), meta))
    return docs


def _read_folder(folder: Path) -> list[Doc]:
    docs = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES):
        text = path.read_text(encoding="utf-8", errors="replace")
        first = text.lstrip().splitlines()[0] if text.strip() else ""
        title = first.lstrip("#").strip() if first.startswith("#") else path.stem
        docs.append(Doc(path.relative_to(folder).as_posix(), text, title, {"path": str(path)}))
    return docs


def read_corpus(source: str | Path) -> tuple[list[Doc], dict]:
    """(documents, {"path", "format", "task"?}) from a JSONL file, a folder of .md/.txt files, a task
    folder, or a bundled task name (its task.yaml's `corpus:`)."""
    path = Path(source).expanduser()
    task_name = None
    if not path.exists() or (path.is_dir() and (path / "task.yaml").is_file()):
        from tunelab.tasks import load_task

        try:
            task = load_task(source)
        except TunelabError:
            raise TunelabError(f"corpus {str(source)!r} is not a file, a folder or a task: give a JSONL file "
                               "(id, text, title?), a folder of .md/.txt files, or a task with a corpus "
                               "(e.g. handbook-qa).") from None
        if not task.spec.corpus:
            raise TunelabError(f"task {task.name!r} has no `corpus:` in its task.yaml; give a JSONL corpus.")
        path, task_name = task.dir / task.spec.corpus, task.name
    if path.is_dir():
        docs, fmt = _read_folder(path), "folder"
    else:
        docs, fmt = _read_jsonl(path), "jsonl"
    if not docs:
        raise TunelabError(f"{path} holds no documents (JSONL rows, or .md/.txt files).")
    seen: set[str] = set()
    for d in docs:
        if d.id in seen:
            raise TunelabError(f"{path}: document id {d.id!r} appears twice; ids must be unique.")
        seen.add(d.id)
    info = {"path": str(path.resolve()), "format": fmt, "docs": len(docs), "sha256": corpus_sha256(docs)}
    if task_name:
        info["task"] = task_name
    return docs, info


def corpus_sha256(docs: list[Doc]) -> str:
    """A hash of the documents' content (ids, titles, texts, metadata), whatever file layout held them."""
    h = hashlib.sha256()
    for d in docs:
        h.update(json.dumps(asdict(d), sort_keys=True, ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def _windows(words: list, size: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) token windows of at most `size` tokens that start and end on word boundaries (`words`:
    the word index of each token), each starting `overlap` tokens (rounded back to a word start) before the
    previous one ended."""
    n = len(words)

    def word_start(i: int) -> int:
        while i > 0 and words[i - 1] is not None and words[i - 1] == words[i]:
            i -= 1
        return i

    out, s = [], 0
    while True:
        e = min(s + size, n)
        if e < n and words[e] is not None and words[e] == words[e - 1] and word_start(e - 1) > s:
            e = word_start(e - 1)  # do not cut a word in two
        out.append((s, e))
        if e == n:
            return out
        nxt = word_start(max(e - overlap, 0))
        s = nxt if nxt > s else e


def chunk_docs(docs: list[Doc], tokenizer, chunk_tokens: int, overlap: int) -> list[Chunk]:
    """Windows of at most `chunk_tokens` tokens (of `tokenizer`, a fast HF tokenizer), neighbours sharing
    about `overlap` tokens, cut on word boundaries; each chunk's text is the exact span of the document."""
    chunks = []
    for d in docs:
        enc = tokenizer(d.text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        if not offsets:
            continue  # an empty document has nothing to retrieve
        for n, (s, e) in enumerate(_windows(enc.word_ids(), chunk_tokens, overlap)):
            chunks.append(Chunk(f"{d.id}#{n}", d.id, d.text[offsets[s][0]:offsets[e - 1][1]], d.title, d.meta))
    return chunks
