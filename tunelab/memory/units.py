"""Sizes people type (24GB, 13B) and the GPUs the estimate checks a total against."""

from __future__ import annotations

import re

from tunelab.errors import TunelabError

GiB = 1 << 30

# Memory sizes as sold; a "24 GB" card reports 24 GiB to the driver, so capacities are taken in GiB.
GPUS: dict[str, str] = {
    "16GB": "T4, V100-16GB, RTX 4080",
    "24GB": "RTX 3090/4090, A10, L4",
    "40GB": "A100 40GB",
    "48GB": "A6000, RTX 6000 Ada, L40S",
    "80GB": "A100 80GB, H100",
    "96GB": "H100 NVL, RTX PRO 6000",
    "141GB": "H200",
}

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*$", re.I)
_COUNT = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmbt]?)\s*$", re.I)


def gpu_bytes(label: str) -> int:
    """Capacity of a GPU size label such as '24GB' (in GiB, as the cards report it)."""
    return int(float(label.removesuffix("GB")) * GiB)


def parse_bytes(text: str | int | float) -> int:
    """'24GB', '24GiB', '24g', '512MB' or a plain byte count -> bytes (GB is read as GiB, like GPU sizes)."""
    if isinstance(text, (int, float)):
        return int(text)
    m = _SIZE.match(str(text))
    if not m:
        raise TunelabError(f"cannot read memory size {text!r}: write it like 24GB, 80GiB or 512MB.")
    value, unit = float(m.group(1)), m.group(2).lower()
    return int(value * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": GiB, "t": 1 << 40}[unit])


def parse_count(text: str | int | float) -> int:
    """'13B', '7.6b', '135M' or a plain number -> a parameter count."""
    if isinstance(text, (int, float)):
        return int(text)
    m = _COUNT.match(str(text))
    if not m:
        raise TunelabError(f"cannot read parameter count {text!r}: write it like 13B, 7.6B or 135M.")
    value, unit = float(m.group(1)), m.group(2).lower()
    return int(round(value * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[unit]))


def gib(n: int | float) -> str:
    """Human bytes in GiB (or MiB below 1 GiB)."""
    if abs(n) < GiB:
        return f"{n / (1 << 20):,.1f} MiB"
    return f"{n / GiB:,.2f} GiB"
