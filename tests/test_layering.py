"""Lower layers never import higher ones (the developers' guide, rule 1)."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "tunelab"
LEVELS = {
    "errors": 0, "config": 0, "runs": 0,
    "models": 1, "data": 1,
    "tasks": 2,
    "infer": 3, "fast": 3,
    "memory": 3,
    "train": 4, "evaluate": 4,
    "merge": 5, "export": 5, "rag": 5,
    "ladder": 6,
    "cli": 7, "server": 7, "demo": 7,
}
PEERS_APART = {("train", "evaluate"), ("evaluate", "train")}


def _layer(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    return rel.parts[0]


def _imports(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_every_layer_is_known():
    unknown = {_layer(p) for p in PKG.rglob("*.py")} - set(LEVELS) - {"__init__"}
    assert not unknown, f"add these packages to LEVELS in {__file__}: {unknown}"


def test_no_back_edges():
    bad = []
    for path in PKG.rglob("*.py"):
        src = _layer(path)
        if src == "__init__":
            continue
        for mod in _imports(path):
            parts = mod.split(".")
            if parts[0] != "tunelab" or len(parts) < 2:
                continue
            dst = parts[1]
            if dst not in LEVELS:
                continue
            if LEVELS[dst] > LEVELS[src] or (src, dst) in PEERS_APART:
                bad.append(f"{path.relative_to(PKG.parent)} imports {mod} ({src} -> {dst})")
    assert not bad, "layering violations:\n" + "\n".join(bad)


def test_detects_a_back_edge(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("from tunelab.train import train\n")
    assert list(_imports(f)) == ["tunelab.train"]
