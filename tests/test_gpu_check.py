"""bench/gpu_check.py's CPU smoke run (`--device cpu --tiny`): every section runs and writes finite numbers."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _numbers(node, path="$"):
    """(path, value) of every number in a JSON document (booleans are not numbers here)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield path, node


def test_gpu_check_tiny_cpu_run_writes_every_section(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--tiny",
                           "--out", str(out), "--workdir", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    data = json.loads(out.read_text())
    assert data["errors"] == {} and data["tiny"] is True and data["info"]["device"] == "cpu"
    bad = [p for p, x in _numbers(data) if not math.isfinite(x)]
    assert not bad, f"numbers that are not finite: {bad}"

    steps = data["sizes"]["steps"]
    train = data["sections"]["train"]
    assert set(train) == {"lora", "qlora"}  # bitsandbytes is a dependency and runs on the CPU: QLoRA too
    for method, r in train.items():
        assert r["method"] == method and r["steps"] == steps == len(r["losses"]), r
        assert r["attention"] == "sdpa" and r["device"] == "cpu"
        for key in ("steps_per_s", "tokens_per_s", "peak_memory_mib", "first_step_s"):
            assert r[key] > 0, (method, key, r[key])
        assert r["final_loss"] == r["losses"][-1] and (Path(r["adapter"]) / "adapter_config.json").is_file()

    inference = data["sections"]["inference"]
    assert set(inference["adapters"]) == {"lora", "qlora"}
    for label, rows in (("batched", data["sizes"]["prompts"]), ("single", data["sizes"]["single_prompts"])):
        section = inference[label]
        for name in ("engine", "generate"):
            r = section[name]
            assert r["tokens"] > 0 and r["tokens_per_s"] > 0 and r["seconds"] > 0, (label, name, r)
        assert section["ratio"] > 0 and section["agreement"]["rows"] == rows
        assert 0 <= section["agreement"]["identical"] <= rows
    assert section["engine"]["ttft_p50_s"] > 0

    names = [c["check"] for c in data["checks"]]
    assert all(isinstance(c["ok"], bool) for c in data["checks"])
    for part in ("lora: every loss finite", "qlora: loss falling", "attention is sdpa", "batched: engine = generate",
                 "single: engine = generate"):
        assert any(part in n for n in names), (part, names)
    assert "summary" in proc.stdout and "batched" in proc.stdout
