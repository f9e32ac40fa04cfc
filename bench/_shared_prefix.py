"""The few-shot section of bench/generate_throughput.py: a decoding step of 64 few-shot rows (about 1,000 shared
prompt tokens) against a zero-shot step, with the shared prefix attended once per step (cascade attention) and,
as the peer, every row attending its own copy (plain attention, what the engine did before).

Four engines run in lockstep, one step each in turn (the order rotating), so their k-th decoding steps run
seconds apart and go through the same drift of a shared VM: zero-shot (the task's system prompt, 239 tokens,
is a shared prefix too) and few-shot, each with cascade and with plain attention. Only steps where all rows
decode (none waiting, none finished) are compared.
"""

from __future__ import annotations

import os
import statistics
import time

from _common import BUNDLED, check, fmt, log, print_table

PLAIN = 10 ** 9  # BatchEngine.cascade_min past any prompt: plain attention


def few_shot_prompts(task, tokenizer, examples: list[dict], tokens: int) -> tuple[list[list[dict]], int]:
    """The examples' chat prompts behind the fewest train examples (as few-shot turns) whose shared prompt
    prefix reaches `tokens`, and that prefix's length in tokens."""
    from tunelab.infer import chat_prompt

    shots, shared = [], 0
    for shot in task.examples("train"):
        shots.append(shot)
        ids = [tokenizer(chat_prompt(tokenizer, task.messages(e, few_shot=shots)), add_special_tokens=False)
               ["input_ids"] for e in examples[:2]]
        shared = len(os.path.commonprefix(ids))
        if shared >= tokens:
            break
    return [task.messages(e, few_shot=shots) for e in examples], shared


def _lockstep(engines: dict, rows: int) -> dict[str, list[float]]:
    """Step every engine in turn until all finish; each engine's full decoding steps' seconds, in order."""
    steps: dict[str, list[float]] = {k: [] for k in engines}
    names = list(engines)
    turn = 0
    while any(e.has_unfinished() for e in engines.values()):
        turn += 1
        for name in names[turn % len(names):] + names[:turn % len(names)]:
            eng = engines[name]
            if not eng.has_unfinished():
                continue
            full = not eng.waiting and len(eng.running) == rows and all(not r.finished for r in eng.running)
            t0 = time.perf_counter()
            eng.step()
            if full:
                steps[name].append(time.perf_counter() - t0)
    return steps


def few_shot_section(task, examples: list[dict], tokens: int, new_tokens: int) -> dict:
    """Zero-shot, few-shot with cascade attention and few-shot with plain attention in lockstep, every row
    generating `new_tokens`; the step ratios at all rows and whether the two few-shot runs agree."""
    from tunelab.infer import Request, SamplingParams, load_engine

    rows = len(examples)
    engines = {k: load_engine(BUNDLED, dtype="auto", kind="batched", max_batch=rows) for k in
               ("zero-shot", "zero-shot, plain attention (before)", "few-shot, cascade attention",
                "few-shot, plain attention (before)")}
    for k in ("zero-shot, plain attention (before)", "few-shot, plain attention (before)"):
        engines[k].cascade_min = PLAIN  # the task's system prompt alone is a shared prefix (239 tokens)
    for e in engines.values():
        e.prefill_tokens = 1 << 20  # every row admitted at once: all of them decode every compared step
    few, shared = few_shot_prompts(task, engines["zero-shot"].tokenizer, examples, tokens)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    handles = {k: [e.add_request(Request(p, params=params)) for p in (few if "few" in k else
                                                                       [task.messages(x) for x in examples])]
               for k, e in engines.items()}
    log.print(f"few-shot: {rows} rows x {new_tokens} tokens, {shared} shared prompt tokens, 4 engines in lockstep")
    steps = _lockstep(engines, rows)
    n = min(len(v) for v in steps.values())
    zero = steps["zero-shot"][:n]
    table, ratios = [], {}
    for name, v in steps.items():
        ratios[name] = statistics.median(a / b for a, b in zip(v[:n], zero)) if n else None
        table.append([name, fmt(1000 * statistics.median(v[:n])) if n else None,
                      f"{ratios[name]:.2f}x" if ratios[name] else None])
    same = sum(a.token_ids == b.token_ids for a, b in zip(handles["few-shot, cascade attention"],
                                                           handles["few-shot, plain attention (before)"]))
    print_table(f"decoding steps at {rows} rows: {shared} shared few-shot prompt tokens vs zero-shot "
                f"({n} steps in lockstep; median of the per-step ratios)", ["system", "ms/step", "vs zero-shot"],
                table)
    x, p = ratios["few-shot, cascade attention"], ratios["few-shot, plain attention (before)"]
    z = ratios["zero-shot, plain attention (before)"]
    targets = [["few-shot / zero-shot step, cascade", f"{x:.2f}x" if x else "-", "<= 1.3x", check(bool(x) and x <= 1.3)],
               ["  ... plain attention (before)", f"{p:.2f}x" if p else "-", "(info)", ""],
               ["zero-shot step, plain attention / cascade", f"{z:.2f}x" if z else "-", "(info)", ""],
               # bf16: the two partial sums round apart from plain attention's one, and a greedy answer that
               # meets a near tie then goes another way; in fp32 they are equal (tests/test_infer.py)
               ["few-shot answers equal to plain attention's (bf16)", f"{same}/{rows}", "(info; fp32: all)", ""]]
    print_table("few-shot targets", ["measure", "value", "target", ""], targets)
    return {"shared_tokens": shared, "steps": steps, "ratios": ratios, "same_answers": same, "targets": targets}
