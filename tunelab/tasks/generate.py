"""Regenerate a bundled task's data: `python -m tunelab.tasks.generate orders-json --out DIR --seed 0`.

Writes the JSONL splits and generated assets (database, corpus) into DIR and copies the task's
hand-written files (task.yaml, schema) there too, so DIR loads with `load_task(DIR)`. With the
default sizes and seed 0 it reproduces the bundled files; smaller sizes give a prefix of each split.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
from pathlib import Path
from types import ModuleType

from tunelab.errors import TunelabError
from tunelab.tasks._gen._common import write_jsonl
from tunelab.tasks.task import TASKS_DIR

GENERATED = ("orders-json", "shop-sql", "handbook-qa", "general", "safety")


def generator(name: str) -> ModuleType:
    """The generator module of a bundled task (tunelab.tasks._gen.<name with underscores>)."""
    if name not in GENERATED:
        raise TunelabError(f"no generator for task {name!r}; generated tasks are {', '.join(GENERATED)}")
    return importlib.import_module(f"tunelab.tasks._gen.{name.replace('-', '_')}")


def generate(name: str, out: str | Path, sizes: dict[str, int] | None = None, seed: int = 0) -> dict[str, int]:
    """Write task `name`'s splits (and assets) into `out`; returns the size of each split written.

    sizes: examples per split (default: the generator's bundled sizes; splits not listed are skipped).
    """
    gen = generator(name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = dict(gen.SIZES if sizes is None else sizes)
    unknown = set(sizes) - set(gen.SIZES)
    if unknown:
        raise TunelabError(f"task {name!r} has no split(s) {sorted(unknown)}; its splits are {list(gen.SIZES)}")
    if hasattr(gen, "write_assets"):
        gen.write_assets(out, seed)
    for split, rows in gen.examples(sizes, seed).items():
        write_jsonl(out / f"{split}.jsonl", rows)
    bundled = TASKS_DIR / name
    if out.resolve() != bundled.resolve():
        for static in getattr(gen, "STATIC_FILES", ("task.yaml",)):
            shutil.copyfile(bundled / static, out / static)
    return sizes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tunelab.tasks.generate", description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=[*GENERATED, "all"])
    parser.add_argument("--out", help="output folder (default for 'all': the bundled task folders)")
    parser.add_argument("--seed", type=int, default=0)
    for split in ("train", "validation", "test"):
        parser.add_argument(f"--{split}", type=int, help=f"{split} examples (default: the bundled size)")
    args = parser.parse_args(argv)
    names = GENERATED if args.task == "all" else (args.task,)
    if args.out is None and args.task != "all":
        parser.error("--out is required (use the task's own folder to rewrite the bundled files)")
    for name in names:
        defaults = generator(name).SIZES
        sizes = {s: getattr(args, s) if getattr(args, s) is not None else n for s, n in defaults.items()}
        out = Path(args.out) / name if args.out and args.task == "all" else Path(args.out or TASKS_DIR / name)
        written = generate(name, out, sizes, args.seed)
        print(f"{name}: {written} -> {out}")


if __name__ == "__main__":
    main()
