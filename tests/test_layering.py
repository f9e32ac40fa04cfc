"""The package's shape: lower layers never import higher ones (the developers' guide, rule 1), no import cycle
inside a package, no function over 80 lines, and bench/ uses public names only."""

import ast
import shutil
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "tunelab"
# Data flows down (../shared/STYLE.md, "Shape of the package"); a package imports only lower levels, and a peer
# on its own level only where PEER_EDGES allows it.
LEVELS = {
    "errors": 0, "progress": 0, "config": 0, "runs": 0,
    "models": 1, "data": 1,
    "tasks": 2,
    "infer": 3, "fast": 3, "memory": 3,
    "train": 4, "evaluate": 4, "plan": 4,
    "merge": 5, "export": 5, "rag": 5, "distill": 5,
    "ladder": 6, "ops": 6,
    "server": 7, "ui": 7, "demo": 7, "demo_loop": 7,
    "cli": 8,
    "__main__": 9,
}
PEER_EDGES = {  # (importer, imported) on the same level -> why that edge is fine
    ("config", "errors"): "schemas raise the one error type",
    ("runs", "errors"): "artifact readers raise the one error type",
    ("runs", "config"): "the registry reads where TUNELAB_HOME is",
    ("data", "models"): "tokenising asks the model's chat template and dtype rules",
    ("memory", "fast"): "the estimator counts what the CPU fast paths keep alive",
    ("train", "plan"): "`tunelab train` runs the linter and preflight before it starts",
    ("export", "merge"): "exporting an adapter into a model merges it first",
    ("ui", "server"): "the UI logs tenants in with keys.yaml and chats through the serving service",
    ("demo_loop", "server"): "the loop demo serves orders@v1 and v2 through the real server, as a shop would",
}


def _layer(path: Path, pkg: Path = PKG) -> str:
    rel = path.relative_to(pkg).with_suffix("")
    return rel.parts[0]


def _module_file(name: str, pkg: Path) -> Path | None:
    """The file under `pkg` that defines module `name` ("tunelab.a.b"), or None."""
    p = pkg.joinpath(*name.split(".")[1:])
    if p.with_suffix(".py").is_file():
        return p.with_suffix(".py")
    return p / "__init__.py" if (p / "__init__.py").is_file() else None


def _imports(path: Path, pkg: Path = PKG):
    """Absolute names of the modules `path` imports, wherever the import sits (module level, a function body,
    an `if TYPE_CHECKING:` block): relative imports resolved against its package, and `from a import b` named
    `a.b` when b is a module of ours."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = ("tunelab", *path.relative_to(pkg).with_suffix("").parts)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module
            else:
                up = here[:len(here) - node.level] if path.name != "__init__.py" else here[:len(here) - node.level + 1]
                base = ".".join((*up, node.module) if node.module else up)
            if base.split(".")[0] != "tunelab":
                yield base
                continue
            yield from dict.fromkeys(f"{base}.{a.name}" if _module_file(f"{base}.{a.name}", pkg) else base
                                     for a in node.names)


def violations(pkg: Path = PKG) -> list[str]:
    """Every import under `pkg` from a lower level to a higher one, or between peers that PEER_EDGES does not
    allow."""
    bad = []
    for path in sorted(pkg.rglob("*.py")):
        src = _layer(path, pkg)
        if src == "__init__":
            continue
        for mod in _imports(path, pkg):
            parts = mod.split(".")
            if parts[0] != "tunelab" or len(parts) < 2 or parts[1] not in LEVELS or parts[1] == src:
                continue
            dst = parts[1]
            if LEVELS[dst] > LEVELS[src]:
                bad.append(f"{path.relative_to(pkg.parent)} imports {mod} ({src} -> {dst})")
            elif LEVELS[dst] == LEVELS[src] and (src, dst) not in PEER_EDGES:
                bad.append(f"{path.relative_to(pkg.parent)} imports {mod} ({src} -> {dst}: same level, "
                           "not in PEER_EDGES)")
    return bad


def _graph(pkg: Path) -> dict[str, set[str]]:
    """Module -> the modules of its own top-level package it imports (paths relative to `pkg`)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(pkg.rglob("*.py")):
        src = path.relative_to(pkg)
        for mod in _imports(path, pkg):
            if mod.split(".")[0] != "tunelab":
                continue
            while (f := _module_file(mod, pkg)) is None and "." in mod:
                mod = mod.rsplit(".", 1)[0]
            if f is not None and f != path and len(src.parts) > 1 and f.relative_to(pkg).parts[0] == src.parts[0]:
                graph.setdefault(str(src), set()).add(str(f.relative_to(pkg)))
    return graph


def cycles(pkg: Path = PKG) -> list[list[str]]:
    """The import cycles inside each package under `pkg`: the strongly connected components with more than
    one module (Tarjan), each sorted."""
    graph, index, low, stack, found = _graph(pkg), {}, {}, [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = stack[stack.index(v):]
            del stack[stack.index(v):]
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def _copy(tmp_path: Path) -> Path:
    """The package's Python files, copied into tmp_path/tunelab."""
    pkg = tmp_path / "tunelab"
    shutil.copytree(PKG, pkg, ignore=lambda d, names: [n for n in names if n == "__pycache__" or (
        not n.endswith(".py") and not (Path(d) / n).is_dir())])
    return pkg


def test_every_layer_is_known():
    unknown = {_layer(p) for p in PKG.rglob("*.py")} - set(LEVELS) - {"__init__"}
    assert not unknown, f"add these packages to LEVELS in {__file__}: {unknown}"


def test_no_back_edges_and_no_undeclared_peer_edges():
    bad = violations()
    assert not bad, "layering violations:\n" + "\n".join(bad)


def test_every_allowed_peer_edge_is_used():
    used = {(_layer(p), mod.split(".")[1]) for p in PKG.rglob("*.py") for mod in _imports(p)
            if mod.startswith("tunelab.")}
    assert not set(PEER_EDGES) - used, f"remove from PEER_EDGES (nothing imports that way): {set(PEER_EDGES) - used}"


def test_no_cycles_inside_a_package():
    found = cycles()
    assert not found, "import cycles inside a package (move what both need into a third module):\n" + "\n".join(
        " <-> ".join(c) for c in found)


def test_every_kind_of_import_is_an_edge(tmp_path):
    """A back-edge counts wherever the import sits: module level, a function body, a TYPE_CHECKING block."""
    pkg = tmp_path / "tunelab"
    for d in ("models", "train"):
        (pkg / d).mkdir(parents=True)
        (pkg / d / "__init__.py").write_text("")
    (pkg / "train" / "sft.py").write_text("")
    (pkg / "models" / "top.py").write_text("import tunelab.train\n")
    (pkg / "models" / "late.py").write_text("def f():\n    from ..train import sft\n")
    (pkg / "models" / "typing_only.py").write_text(
        "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from tunelab.train.sft import Thing\n")
    (pkg / "train" / "fine.py").write_text("from ..models import top\n")
    assert violations(pkg) == ["tunelab/models/late.py imports tunelab.train.sft (models -> train)",
                               "tunelab/models/top.py imports tunelab.train (models -> train)",
                               "tunelab/models/typing_only.py imports tunelab.train.sft (models -> train)"]


def test_a_planted_back_edge_is_reported(tmp_path):
    """A copy of the package with one module in models/ importing the trainer (absolutely, and relatively)."""
    pkg = _copy(tmp_path)
    assert violations(pkg) == []
    (pkg / "models" / "planted.py").write_text('"""A back-edge."""\n\nfrom tunelab.train import train\n')
    (pkg / "fast" / "planted_rel.py").write_text('"""Another."""\n\nfrom ..train.sft import setup\n')
    (pkg / "train" / "fine.py").write_text('"""A forward edge: allowed."""\n\nfrom ..models import load_model\n')
    assert violations(pkg) == ["tunelab/fast/planted_rel.py imports tunelab.train.sft (fast -> train)",
                               "tunelab/models/planted.py imports tunelab.train (models -> train)"]


def test_a_planted_peer_edge_is_reported(tmp_path):
    """train and evaluate sit on one level; an edge between them that PEER_EDGES does not list fails."""
    pkg = _copy(tmp_path)
    (pkg / "train" / "planted.py").write_text('"""A peer edge."""\n\nfrom tunelab.evaluate.harness import run_variants\n')
    (pkg / "plan" / "allowed.py").write_text('"""Inside its own package: fine."""\n\nfrom .lint import lint\n')
    assert violations(pkg) == ["tunelab/train/planted.py imports tunelab.evaluate.harness (train -> evaluate: same "
                               "level, not in PEER_EDGES)"]


def test_a_planted_cycle_inside_a_package_is_reported(tmp_path):
    """ladder/rungs.py importing ladder/climb.py (which imports rungs) from a function body, and a
    TYPE_CHECKING-only circle in rag/: both are cycles."""
    pkg = _copy(tmp_path)
    assert cycles(pkg) == []
    with (pkg / "ladder" / "rungs.py").open("a") as f:
        f.write("\n\ndef _planted():\n    from tunelab.ladder.climb import run_ladder\n")
    (pkg / "rag" / "a.py").write_text("from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from .b import B\n")
    (pkg / "rag" / "b.py").write_text("from tunelab.rag import a\n")
    assert cycles(pkg) == [["ladder/climb.py", "ladder/rungs.py"], ["rag/a.py", "rag/b.py"]]


MAX_FUNCTION_LINES = 80


def long_functions(root: Path = PKG, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """Every function or method under `root` longer than `limit` lines (from `def` to its last line)."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    bad.append(f"{path.relative_to(root.parent)}::{node.name} ({n} lines)")
    return bad


def test_no_function_over_80_lines(tmp_path):
    bad = long_functions()
    assert not bad, f"split these (no function over {MAX_FUNCTION_LINES} lines):\n" + "\n".join(bad)
    body = "".join(f"x{i} = {i}\n" for i in range(79))
    (tmp_path / "m.py").write_text("def fits():\n" + textwrap.indent(body, "    ") + "\n\nclass C:\n"
                                   "    async def over(self):\n" + textwrap.indent(body + "return 1\n", "        "))
    assert long_functions(tmp_path) == [f"{tmp_path.name}/m.py::over (81 lines)"]


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
