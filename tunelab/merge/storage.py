"""Storage for N tenants, from the real files: one base plus N adapters, against N merged copies."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import TunelabError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


def weights_bytes(path: str | Path) -> int:
    """Bytes of the weight files of a folder (or of one weight file)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    files = [f for f in path.rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES]
    if not files:
        raise TunelabError(f"{path} holds no weight files ({', '.join(WEIGHT_SUFFIXES)}) to measure.")
    return sum(f.stat().st_size for f in files)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


@dataclass
class StorageReport:
    """N tenants served as one base + N adapters vs N merged models (the guide's 'Serving LoRA adapters')."""

    tenants: int
    base_bytes: int
    adapter_bytes: list[int]  # the measured adapters; the mean stands for each tenant's adapter
    merged_bytes: int  # one merged copy: measured when one was written, else the base's size

    @property
    def adapter_mean(self) -> float:
        return sum(self.adapter_bytes) / len(self.adapter_bytes)

    @property
    def with_adapters(self) -> float:
        return self.base_bytes + self.tenants * self.adapter_mean

    @property
    def merged_total(self) -> int:
        return self.tenants * self.merged_bytes

    def as_dict(self) -> dict:
        return {"tenants": self.tenants, "base_bytes": self.base_bytes, "adapter_bytes": self.adapter_bytes,
                "merged_bytes": self.merged_bytes, "with_adapters_bytes": round(self.with_adapters),
                "merged_total_bytes": self.merged_total, "ratio": round(self.merged_total / self.with_adapters, 2)}

    def text(self) -> str:
        return (f"storage for {self.tenants} tenants: 1 base ({_human(self.base_bytes)}) + {self.tenants} adapters "
                f"({_human(self.adapter_mean)} each) = {_human(self.with_adapters)}; {self.tenants} merged copies "
                f"({_human(self.merged_bytes)} each) = {_human(self.merged_total)}; merged needs "
                f"{self.merged_total / self.with_adapters:.1f}x the space")


def storage_report(base: dict | str | Path, adapters: list[Path], tenants: int,
                   merged: Path | None = None) -> StorageReport:
    """Measure the base (an identity record from run.json/merge.json, or a path), the adapters and, when given,
    a merged model folder; report the storage of `tenants` tenants both ways."""
    if tenants < 1:
        raise TunelabError(f"--tenants {tenants}: give a positive number of tenants.")
    base_path = base.get("path") if isinstance(base, dict) else base
    if not base_path or not Path(base_path).exists():
        raise TunelabError(f"the base model's files are not on this machine ({base_path or base}); the storage "
                           "report measures real files.")
    base_bytes = weights_bytes(base_path)
    sizes = [weights_bytes(a) for a in adapters]
    return StorageReport(tenants, base_bytes, sizes, weights_bytes(merged) if merged else base_bytes)
