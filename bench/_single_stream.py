"""The single-stream section of bench/generate_throughput.py: one request at a time, greedy, on the CPU.

Systems, each request run by each in turn (interleaved, so every system sees the same drift of this VM):
  tunelab (auto, one at a time)   what `load_engine(..., max_batch=1)` picks on the CPU: the llama.cpp engine on
                                  tunelab's GGUF of the same weights (bf16 -> f16); a LoRA merged into its own;
                                  greedy rows decode with prompt-lookup drafts (counts printed after the table)
  tunelab batched engine          the batched engine given one request at a time (what ran before)
  llama.cpp                       llama-cpp-python as a user runs it (`create_completion`, streamed, n_threads
                                  2) on tunelab's f16 GGUF export, with the LoRA: on tunelab's LoRA GGUF export
tokens/s: generated tokens over each system's total wall time (prefill included); TTFT: median seconds from
the call to the first token.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from _common import BUNDLED, check, fmt, log, print_table

THREADS = 2  # llama.cpp's threads, as in issue 31's measurement


def _ours(engine, request) -> tuple[int, float, float]:
    """(tokens, seconds, ttft) of one request through an engine's add_request / step."""
    t0 = time.perf_counter()
    h = engine.add_request(request)
    while not h.finished:
        engine.step()
    c = h.completion()
    return len(c.token_ids), time.perf_counter() - t0, c.first_token_time - t0


def _llama(llm, text: str, new_tokens: int) -> tuple[int, float, float]:
    """(tokens, seconds, ttft) of one streamed llama-cpp-python completion, greedy."""
    t0, first, n = time.perf_counter(), None, 0
    for _ in llm.create_completion(text, max_tokens=new_tokens, temperature=0.0, stream=True):
        first = first or time.perf_counter()
        n += 1
    return n, time.perf_counter() - t0, (first or time.perf_counter()) - t0


def _references(work: Path, adapter: str):
    """llama-cpp-python on tunelab's f16 GGUF export, without and with tunelab's LoRA GGUF export."""
    import llama_cpp

    from tunelab.export import export

    base = export(BUNDLED, work / "gguf-f16", "gguf", quant="f16")
    lora = export(adapter, work / "gguf-lora", "gguf-lora", model=BUNDLED)
    model = base.out / base.info["gguf_file"]
    kw = dict(n_threads=THREADS, n_threads_batch=THREADS, n_ctx=2048, verbose=False)
    return (llama_cpp.Llama(model_path=str(model), **kw),
            llama_cpp.Llama(model_path=str(model), lora_path=str(lora.out / lora.info["gguf_file"]), **kw))


def single_stream_section(prompts: list[list[dict]], adapter: str, work: Path, new_tokens: int,
                          repeats: int, batched: bool = True) -> dict:
    """Every prompt through every system, interleaved, `repeats` times; a table with the ratios to llama.cpp."""
    from tunelab.infer import Request, SamplingParams, chat_prompt, load_engine

    auto = load_engine(BUNDLED, {"t0": adapter}, dtype="auto", device="cpu", max_batch=1)
    engine = load_engine(BUNDLED, {"t0": adapter}, dtype="auto", device="cpu", kind="batched", max_batch=1)
    ref, ref_lora = _references(work, adapter)
    texts = [chat_prompt(auto.tokenizer, p) for p in prompts]
    params = SamplingParams(max_new_tokens=new_tokens)
    systems = {
        "tunelab (auto, one at a time)": lambda i: _ours(auto, Request(prompts[i], params=params)),
        "tunelab batched engine": lambda i: _ours(engine, Request(prompts[i], params=params)),
        "llama.cpp": lambda i: _llama(ref, texts[i], new_tokens),
        "tunelab (auto) + LoRA": lambda i: _ours(auto, Request(prompts[i], adapter="t0", params=params)),
        "tunelab batched engine + LoRA": lambda i: _ours(engine, Request(prompts[i], adapter="t0", params=params)),
        "llama.cpp + LoRA": lambda i: _llama(ref_lora, texts[i], new_tokens),
    }
    if not batched:  # the slowest rows: what ran before
        systems = {k: v for k, v in systems.items() if "batched" not in k}
    log.print(f"single stream: {type(auto).__name__} picked for one request at a time; warming up ...")
    for run in systems.values():
        run(0)
    got: dict[str, list[tuple[int, float, float]]] = {k: [] for k in systems}
    for rep in range(repeats):
        log.print(f"single stream, run {rep + 1} of {repeats}: {len(prompts)} prompts x {len(systems)} systems ...")
        for i in range(len(prompts)):
            names = list(systems)
            for name in names[i % len(names):] + names[:i % len(names)]:  # who runs after whom rotates
                got[name].append(systems[name](i))
    out = _table(got, type(auto).__name__, len(prompts), new_tokens)
    d = out["drafts"] = getattr(auto, "drafts", None)  # the llama.cpp engine's prompt-lookup counts, all runs
    if d:
        log.print(f"prompt lookup (tunelab auto rows, warm-up included): {d['forwards']:,} decode forwards, "
                  f"{d['drafted']:,} draft tokens run, {d['taken']:,} taken ({d['taken'] / max(d['drafted'], 1):.0%})")
    return out


def _table(got: dict, picked: str, n: int, new_tokens: int) -> dict:
    stats = {k: {"tokens": sum(t for t, _, _ in v), "seconds": sum(s for _, s, _ in v),
                 "ttft_p50": statistics.median(f for _, _, f in v)} for k, v in got.items()}
    for s in stats.values():
        s["tokens_per_s"] = s["tokens"] / s["seconds"]
    rows = []
    for name, s in stats.items():
        peer = stats["llama.cpp + LoRA" if "LoRA" in name else "llama.cpp"]
        ratio = s["tokens_per_s"] / peer["tokens_per_s"]
        rows.append([name, f"{s['tokens']:,}", fmt(s["seconds"]), fmt(s["tokens_per_s"]), f"{ratio:.2f}x",
                     fmt(s["ttft_p50"] * 1000), f"{s['ttft_p50'] / peer['ttft_p50']:.2f}x"])
    print_table(f"one request at a time: {n} orders-json prompts, up to {new_tokens} new tokens, greedy "
                f"(auto picked {picked})", ["system", "tokens", "seconds", "tokens/s", "vs llama.cpp",
                                            "TTFT p50 ms", "TTFT vs llama.cpp"], rows)
    targets = []
    for suffix, mine in (("", "tunelab (auto, one at a time)"), (" + LoRA", "tunelab (auto) + LoRA")):
        ours, peer = stats[mine], stats[f"llama.cpp{suffix}"]
        x, t = ours["tokens_per_s"] / peer["tokens_per_s"], ours["ttft_p50"] / peer["ttft_p50"]
        targets += [[f"single-stream tokens/s vs llama.cpp{suffix}", f"{x:.2f}x", ">= 1.0x", check(x >= 1.0)],
                    [f"  TTFT p50 vs llama.cpp{suffix}", f"{t:.2f}x", "<= 1.0x", check(t <= 1.0)]]
    print_table("single-stream targets", ["measure", "value", "target", ""], targets)
    return {"systems": stats, "picked": picked, "targets": targets}
