"""Subcommands that ship: serve, demo, merge, export."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from tunelab.cli._app import DeviceOpt, LoadInOpt, ModelOpt, app, out, say
from tunelab.config.paths import DEFAULT_MODEL
from tunelab.errors import TunelabError


@app.command()
def serve(
    model: ModelOpt = DEFAULT_MODEL,
    adapters: Annotated[Path | None, typer.Option(help="folder whose subfolders are the servable adapters "
                                                         "(or one adapter folder)")] = None,
    keys: Annotated[Path | None, typer.Option(help="keys.yaml: tenants, hashed API keys, their adapters "
                                                     "(docs/serving.md)")] = None,
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    max_adapters: Annotated[int, typer.Option(help="adapters resident at once (LRU)")] = 8,
    pin: Annotated[list[str] | None, typer.Option(help="adapter kept resident (repeatable)")] = None,
    merged: Annotated[Path | None, typer.Option(help="serve this adapter merged into the base (one tenant)")]
    = None,
    max_waiting: Annotated[int, typer.Option(help="requests in flight before 429")] = 256,
    rag_index: Annotated[list[str] | None, typer.Option(help="NAME=DIR: an index requests may name in "
                                                             "`rag_index` (repeatable)")] = None,
    device: DeviceOpt = "auto",
    load_in: LoadInOpt = None,
    hash_key: Annotated[str | None, typer.Option(help="print the keys.yaml hash of an API key and exit")] = None,
    log: Annotated[str | None, typer.Option(help="request log: a SQLite file or postgresql:// URL (default: "
                                                 "requests.sqlite beside the registry; off: none)")] = None,
    log_days: Annotated[float | None, typer.Option(help="request log: delete rows older than this")] = None,
    log_max_mb: Annotated[float | None, typer.Option(help="request log: delete the oldest rows beyond this")]
    = None,
    otlp: Annotated[str | None, typer.Option(help="also send each request's span (GenAI attributes) to this "
                                                  "OTLP/HTTP endpoint, e.g. http://localhost:4318/v1/traces")]
    = None,
    ui: Annotated[bool, typer.Option("--ui", help="also serve the web UI at /ui: the pages of `tunelab ui`, "
                                                  "its playground on this server")] = False,
    engine: Annotated[str, typer.Option(help="tunelab, or vllm: export the adapters for vLLM and print its "
                                              "command (--run starts it, --upstream fronts a running one)")]
    = "tunelab",
    run: Annotated[bool, typer.Option(help="--engine vllm: start `vllm serve` and the key proxy")] = False,
    upstream: Annotated[str | None, typer.Option(help="--engine vllm: the URL of a running vLLM to put the "
                                                      "key proxy in front of")] = None,
    export_dir: Annotated[Path, typer.Option(help="--engine vllm: where the adapters are exported")]
    = Path("runs/vllm-adapters"),
) -> None:
    """An OpenAI-compatible server: /v1/chat/completions, /v1/completions, /v1/models, adapters per tenant."""
    if hash_key is not None:
        from tunelab.server import hash_key as digest

        print(digest(hash_key))
        return
    if engine not in ("tunelab", "vllm"):
        raise TunelabError(f"--engine {engine!r}: tunelab or vllm.")
    if engine == "vllm":
        from tunelab.server.vllm import plan_vllm, run_proxy, run_vllm

        keys_file = str(keys) if keys else None
        if upstream:  # only the key proxy, in front of a running vLLM
            run_proxy(upstream, keys_file, model, host, port)
            return
        plan = plan_vllm(model, str(adapters) if adapters else None, export_dir, upstream_port=port + 1)
        say(plan.command)
        say(plan.proxy_command(port, keys_file))
        if run:
            run_vllm(plan, keys_file, host, port)
        return
    from tunelab.server import serve as run_server

    indexes = {}
    for item in rag_index or []:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise TunelabError(f"--rag-index {item!r}: write NAME=DIR, e.g. handbook=runs/idx-handbook.")
        indexes[name] = folder
    root = None
    if adapters is not None:  # what will be served, and why any subfolder will not, before the model loads
        from tunelab.runs.adapter_folder import AdapterRoot

        root = AdapterRoot(adapters)
        for line in root.scan().lines():
            out.print(escape(line), soft_wrap=True)
    retention = _retention(log_days, log_max_mb)
    run_server(model, root, keys, host, port, max_adapters, pin or [], device=device, max_waiting=max_waiting,
               merged=merged, indexes=indexes, load_in=load_in, log=log, log_retention=retention, otlp=otlp,
               mount=_ui(host) if ui else None)


def _ui(host: str):
    """What mounts the web UI into the server's app (`serve --ui`)."""
    from tunelab.ui import mount_ui

    return lambda server_app: mount_ui(server_app, host)


def _retention(days: float | None, max_mb: float | None):
    """--log-days / --log-max-mb as the request log's Retention (None: keep everything)."""
    if days is None and max_mb is None:
        return None
    from tunelab.ops.logwriter import Retention

    return Retention(None if days is None else days * 86400, None if max_mb is None else int(max_mb * 2**20))


@app.command()
def demo(
    limit: Annotated[int, typer.Option(help="test examples to evaluate")] = 32,
    steps: Annotated[int | None, typer.Option(help="optimizer steps (default: the demo recipe's)")] = None,
    out: Annotated[Path | None, typer.Option(help="output folder (default: runs/demo, runs/demo-loop with --loop)")]
    = None,
    loop: Annotated[bool, typer.Option("--loop", help="the production loop instead: serve orders@v1, drift, "
                                                      "review, v2, gate, canary, promotion (make demo-loop)")] = False,
) -> None:
    """Two ladders on the bundled model (orders-json: finetune; handbook-qa: retrieve), in one report; with
    --loop, the production loop from served traffic to the next adapter version."""
    if loop:
        from tunelab.demo_loop import LoopDemoConfig, run_loop_demo

        cfg = LoopDemoConfig(out=out or Path("runs/demo-loop"), golden=limit)
        if steps is not None:
            cfg.v1_steps = cfg.v2_steps = steps
        res = run_loop_demo(cfg)
        _render_loop(res.steps)
        stages = ", ".join(f"{k} {v:.0f}s" for k, v in res.stage_seconds.items())
        say(f"everything is in {res.out} (demo-loop.json: these numbers)\ntotal {res.seconds:.0f}s ({stages})")
        if not res.steps["loop"]["passed"]:
            raise typer.Exit(1)
        return
    from tunelab.demo import run_demo

    d = run_demo(limit=limit, out=out or Path("runs/demo"), steps=steps)
    for task, res in d.results.items():
        say(f"{task}: {res.recommendation.headline}")
    say(f"report: {d.page}\ntotal {d.seconds:.0f}s")


def _render_loop(s: dict) -> None:
    """The loop demo's numbers, stage by stage, ending with v2's lineage."""
    v1 = s["v1"]
    say(f"orders@v1: {'trained in ' + str(round(v1['seconds'])) + 's' if v1['trained'] else 'kept'} ({v1['folder']})")
    t = s["traffic"]
    say(f"traffic: {t['baseline']} orders as customers write them, then {t['shifted']} in a new style, e.g.\n  "
        f"{escape(t['example'])}\n  log rows name system prompt version(s) {', '.join(t['prompt_versions'])} "
        f"(alias orders' registered prompt: {s['server']['prompt_version']})")
    for name, m in s["monitor"].items():
        emb = m["signals"]["input_embeddings"]
        p = "-" if emb["p_value"] is None else f"p = {emb['p_value']:.4g} (Holm {emb['p_adjusted']:.4g})"
        verdict = f"ALERT on {', '.join(m['alerts'])}" if m["alert"] else "no alert"
        say(f"drift monitor, {name} ({m['rows']} requests): {verdict}; input embeddings (MMD) {p}")
    r = s["review"]
    say(f"review queue: {r['queued']} answers ({', '.join(r['reasons'])}): {r['accept']} accepted, {r['correct']} "
        "corrected. These reviews were AUTOMATED from the task's gold answers, not written by a person.")
    lp = s["loop"]
    if not lp["passed"]:
        say(f"gate FAILED: {'; '.join(lp['gate']['reasons'])} (loop folder {lp['folder']})")
        return
    d = lp["data"]
    say(f"orders@v2: trained on v1's {d['original_train_rows']} rows + {d['reviewed_train_rows']} reviewed rows "
        f"(x{d['repeat']}); {d['heldout_rows']} reviewed rows held out as the new style's test")
    for key, label in (("traffic", "new style (held-out reviewed rows)"), ("golden", "golden set (test split)")):
        n, ch = lp["numbers"][key], lp["numbers"][key]["change"]
        lo, hi = ch["ci95_points"]
        say(f"  {label}, {n['metric']}, n={n['n']}: v1 {n['v1']:.3f} -> v2 {n['v2']:.3f} "
            f"({ch['delta_points']:+.1f} points, 95% CI [{lo:+.1f}, {hi:+.1f}])")
    probes = lp["probes"]
    say("  probes: " + (", ".join(f"{k} {'FLAGGED' if v else 'ok'}" for k, v in probes.items()) if probes else "off")
        + f"\n  gate: passed; canary {', '.join(f'{v}={w:g}%' for v, w in lp['canary'].items())}")
    st = s["rollout"]["status"]
    fb = ", ".join(f"{v} {f:.3f}" for v, f in s["canary"]["feedback_f1"].items())
    say(f"canary: {s['canary']['requests']} more requests ({', '.join(f'{v}: {n}' for v, n in st['requests'].items())}); "
        f"feedback (field F1 against gold) {fb}\n  verdict: {st['decision']} ({'; '.join(st['reasons'])})")
    ro = s["rollout"]
    why = (" (a hold: the always-valid test wants more traffic than the demo sends; the demo promotes on the gate's "
           "numbers and a canary worse on nothing)") if st["decision"] == "hold" else ""
    say(f"promoted: orders now serves {ro['weights']}{why}" if ro["promoted"] else
        "rolled back: v2 was worse on the canary")
    from tunelab.cli.runs import lineage_tree

    out.print(lineage_tree(s["lineage"], "lineage of "))


@app.command("merge")
def merge_cmd(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="output folder (must not exist or be empty)")],
    sources: Annotated[list[Path] | None, typer.Argument(
        help="PEFT LoRA adapter folders on one base, or ONE mergekit YAML (run as it is)")] = None,
    method: Annotated[str | None, typer.Option(
        help="adapters: linear, cat (default), svd, ties, dare_linear, dare_ties, magnitude_prune or an _svd form; "
             "--models: linear, slerp, task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, della, "
             "model_stock, passthrough")] = None,
    models: Annotated[list[str] | None, typer.Option(
        "--models", help="full models to merge with mergekit (repeat or A,B): HF folder, hub id, BASE+ADAPTER "
                         "or an adapter folder (merged into its base first)")] = None,
    base: Annotated[str | None, typer.Option(help="--models: the base the deltas are taken from")] = None,
    weights: Annotated[str | None, typer.Option(help="one weight per adapter / non-base model, e.g. 1,0.5")] = None,
    density: Annotated[float | None, typer.Option(help="kept fraction for ties/dare/magnitude_prune/breadcrumbs/"
                                                       "della")] = None,
    t: Annotated[float | None, typer.Option("--t", help="slerp: 0 = the base, 1 = the other model")] = None,
    layers: Annotated[str | None, typer.Option(help="passthrough: START:END layers per model, e.g. 0:2,1:2")]
    = None,
    dtype: Annotated[str | None, typer.Option(help="--models: float32, bfloat16 or float16")] = None,
    seed: Annotated[int, typer.Option(help="--models: seed of the random methods (dare_*, della)")] = 0,
    majority_sign: Annotated[str | None, typer.Option(help="adapters, ties/dare_ties sign election: total or "
                                                           "frequency")] = None,
    svd_rank: Annotated[int | None, typer.Option(help="adapters: output rank of the _svd methods")] = None,
    name: Annotated[str | None, typer.Option(help="adapters: the merged adapter's name")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="adapters: the base (default: their own)")]
    = None,
    unload: Annotated[bool, typer.Option("--unload", help="merge ONE adapter into its base: an HF folder")] = False,
    tenants: Annotated[int | None, typer.Option(help="adapters: also report storage for N tenants")] = None,
) -> None:
    """Merge LoRA adapters on one base (PEFT), one adapter into its base (--unload), or full models with
    mergekit (--models, or a mergekit YAML; the optional `merge` extra)."""
    from tunelab.merge import merge

    options = dict(method=method, weights=_numbers(weights, "--weights"), density=density, t=t,
                   base=base, layers=_layer_ranges(layers), dtype=dtype, majority_sign_method=majority_sign,
                   svd_rank=svd_rank, name=name, model=model)
    options = {k: v for k, v in options.items() if v is not None}
    models_list = [m for item in models or [] for m in item.split(",") if m]
    res = merge(sources or [], out_dir, unload=unload, tenants=tenants, models=models_list, seed=seed, **options)
    say(res.text())


def _numbers(text: str | None, flag: str) -> list[float] | None:
    try:
        return [float(x) for x in text.split(",")] if text else None
    except ValueError:
        raise TunelabError(f"{flag} {text!r}: give numbers separated by commas, e.g. 1,0.5.") from None


def _layer_ranges(text: str | None) -> list[tuple[int, int]] | None:
    if not text:
        return None
    try:
        return [(int(a), int(b)) for a, b in (span.split(":") for span in text.split(","))]
    except ValueError:
        raise TunelabError(f"--layers {text!r}: give START:END per model, e.g. 0:2,1:2.") from None


@app.command("export")
def export_cmd(
    source: Annotated[str, typer.Argument(help="model (spec, folder, .gguf) or PEFT adapter folder")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="output folder (must not exist or be empty)")],
    format: Annotated[str, typer.Option("--format", "-f", help="hf, gguf, gguf-lora or vllm")] = "gguf",
    quant: Annotated[str, typer.Option(help="GGUF type: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1")] = "f16",
    model: Annotated[str | None, typer.Option("--model", "-m", help="an adapter's base (default: its own)")] = None,
    pre_tokenizer: Annotated[str | None, typer.Option(help="llama.cpp pre-tokenizer name, if not recognised")]
    = None,
    max_lora_rank: Annotated[int, typer.Option(help="vLLM --max-lora-rank to check the adapter against")] = 16,
) -> None:
    """Export a model or adapter as an HF folder, a GGUF (+ Ollama Modelfile), a LoRA GGUF, or a vLLM adapter."""
    from tunelab.export import export

    say(export(source, out_dir, format, quant, model, pre_tokenizer, max_lora_rank).text())

