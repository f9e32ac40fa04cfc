"""Lower layers never import higher ones (the developers' guide, rule 1); bench/ uses public names only."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "tunelab"
LEVELS = {
    "errors": 0, "progress": 0, "config": 0, "runs": 0,
    "models": 1, "data": 1,
    "tasks": 2,
    "infer": 3, "fast": 3,
    "memory": 3,
    "train": 4, "evaluate": 4, "plan": 4,
    "merge": 5, "export": 5, "rag": 5, "distill": 5,
    "ladder": 6,
    "cli": 7, "server": 7, "demo": 7, "__main__": 8,
}
PEERS_APART = {("train", "evaluate"), ("evaluate", "train"), ("plan", "train"), ("plan", "evaluate")}


def _layer(path: Path, pkg: Path = PKG) -> str:
    rel = path.relative_to(pkg).with_suffix("")
    return rel.parts[0]


def _imports(path: Path, pkg: Path = PKG):
    """Absolute names of the modules `path` imports (relative imports resolved against its package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = ("tunelab", *path.relative_to(pkg).with_suffix("").parts)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module:
                    yield node.module
                continue
            base = here[:len(here) - node.level] if path.name != "__init__.py" else here[:len(here) - node.level + 1]
            if node.module:
                yield ".".join((*base, node.module))
            else:
                yield from (".".join((*base, a.name)) for a in node.names)


def violations(pkg: Path = PKG) -> list[str]:
    """Every import from a lower layer to a higher one (or between peers kept apart) under `pkg`."""
    bad = []
    for path in sorted(pkg.rglob("*.py")):
        src = _layer(path, pkg)
        if src == "__init__":
            continue
        for mod in _imports(path, pkg):
            parts = mod.split(".")
            if parts[0] != "tunelab" or len(parts) < 2 or parts[1] not in LEVELS:
                continue
            dst = parts[1]
            if LEVELS[dst] > LEVELS[src] or (src, dst) in PEERS_APART:
                bad.append(f"{path.relative_to(pkg.parent)} imports {mod} ({src} -> {dst})")
    return bad


def test_every_layer_is_known():
    unknown = {_layer(p) for p in PKG.rglob("*.py")} - set(LEVELS) - {"__init__"}
    assert not unknown, f"add these packages to LEVELS in {__file__}: {unknown}"


def test_no_back_edges():
    bad = violations()
    assert not bad, "layering violations:\n" + "\n".join(bad)


def test_detects_a_back_edge(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("from tunelab.train import train\n")
    assert list(_imports(f, tmp_path)) == ["tunelab.train"]


def test_a_planted_back_edge_is_reported(tmp_path):
    """A copy of the package with one module in models/ importing the trainer (absolutely, and relatively)."""
    import shutil

    pkg = tmp_path / "tunelab"
    shutil.copytree(PKG, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    assert violations(pkg) == []
    (pkg / "models" / "planted.py").write_text('"""A back-edge."""\n\nfrom tunelab.train import train\n')
    (pkg / "fast" / "planted_rel.py").write_text('"""Another."""\n\nfrom ..train.sft import setup\n')
    (pkg / "train" / "fine.py").write_text('"""A forward edge: allowed."""\n\nfrom ..models import load_model\n')
    assert violations(pkg) == ["tunelab/fast/planted_rel.py imports tunelab.train.sft (fast -> train)",
                               "tunelab/models/planted.py imports tunelab.train (models -> train)"]


def _private_uses(path: Path) -> list[str]:
    """`tunelab` names a script imports or reaches that start with an underscore (private to tunelab)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    bad, imported = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tunelab":
            names = [a.name for a in node.names]
            bad += [f"{node.module}.{n}" for n in names if n.startswith("_")]
            bad += [node.module] if any(p.startswith("_") for p in node.module.split(".")) else []
            imported |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "tunelab":
                    bad += [a.name] if any(p.startswith("_") for p in a.name.split(".")) else []
                    imported.add((a.asname or a.name).split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in imported:
                bad.append(f"{ast.unparse(node)}")
    return [f"{path.name}: {b}" for b in bad]


def test_bench_uses_public_names_only(tmp_path):
    bad = [b for path in sorted((ROOT / "bench").glob("*.py")) for b in _private_uses(path)]
    assert not bad, "bench/ reaches into tunelab's private names:\n" + "\n".join(bad)
    planted = tmp_path / "b.py"
    planted.write_text("from tunelab.memory._tracker import LiveTensors\nfrom tunelab.data import _x\n"
                       "import tunelab.fast\ntunelab.fast._secret\n")
    assert _private_uses(planted) == ["b.py: tunelab.memory._tracker", "b.py: tunelab.data._x",
                                      "b.py: tunelab.fast._secret"]
