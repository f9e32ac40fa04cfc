"""`tunelab ladder`: run the rungs on the same held-out examples, measure each, and recommend.

One engine serves every rung (the base, then the LoRA adapter once it exists); each rung is an ordinary eval
folder (predictions, metrics with CIs, failure classes), so `tunelab runs lineage` sees what a ladder
report was made from. RAG rungs retrieve with indexes built from the task's corpus; the LoRA rungs use
`--adapter` or train one within `train_steps` optimizer steps (training is timed and recorded).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from tunelab.config.paths import DEFAULT_MODEL
from tunelab.config.recipe import Recipe, load_recipe
from tunelab.errors import TunelabError
from tunelab.evaluate.harness import Variant, primary_metric, run_variants
from tunelab.infer import load_engine
from tunelab.ladder.recommend import Target, recommend
from tunelab.ladder.report import write_ladder
from tunelab.ladder.results import LadderResult, RungResult
from tunelab.ladder.rungs import Rung, plan_rungs
from tunelab.runs import register_folder
from tunelab.runs.layout import ADAPTER_CONFIG, read_eval_folder
from tunelab.tasks import Task, load_task

log = logging.getLogger(__name__)
ADAPTER = "ladder-lora"
# The LoRA the ladder trains, sized for minutes on 2 CPU cores (with train.max_steps=80: ~4 examples per step,
# ~320 of orders-json's 1000 train examples): loss on the responses only, a high LoRA learning rate because
# the run is short, and Adam's beta2 = 0.95 (the guide's range is 0.95-0.999). With 0.999 the second-moment
# estimate remembers the large early gradients, so once the copied tokens are learned the steps shrink and
# the few decision tokens (shipping null or not) are never learned. On 64 orders-json test examples,
# json_exact was 0.16-0.17 with 0.999 (lr 5e-3; or attention-only) and 0.406 with 0.95; shipping errors went
# 25 -> 8. Still unlearned at this budget: whether a note is present. A full epoch (125 steps of 4 rows, ~13
# minutes) learns it: 0.703 json_exact with beta2 0.95, 0.719 with 0.999. Two epochs (500 steps, 31 minutes)
# overfit (validation loss 0.069 at step 160, 0.118 at 500) and reached 0.672. Full finetuning (lr 1e-4, 80
# steps, 330 s) reached 0.359.
TRAIN_RECIPE = [
    "method=lora", "lora.r=16", "lora.alpha=32", "lora.targets=attention+mlp", "lora.dropout=0.0",
    "train.lr=2e-3", "train.batch_size=2", "train.effective_batch=2", "train.prompt_loss_weight=0.0",
    "train.max_length=1024", "train.warmup_ratio=0.05", "train.betas=[0.9,0.95]", "data.limit_validation=16",
    "checkpoint_every=null",
    # the two lint warnings this recipe takes on purpose, with the reasons `tunelab train` prints for them
    "lint.allow={lr-range: 'a short run (40-80 steps) takes a higher LoRA rate than the usual range',"
    " batch-unstable: 'effective batch 2 (two packed rows, ~4 examples) keeps training under 6 CPU minutes'}",
]


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 50 ms)."""

    def __enter__(self):
        import psutil

        self._proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(0.05)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def mb(self) -> float:
        return self.peak / 2**20


def _corpus(task: Task, corpus: str | Path | None) -> Path | None:
    if corpus is not None:
        if not Path(corpus).exists():
            raise TunelabError(f"--corpus {corpus}: no such file or folder.")
        return Path(corpus)
    name = getattr(task.spec, "corpus", None)
    return task.dir / name if name and (task.dir / name).is_file() else None


def _groups(meta: dict, primary: str) -> dict[str, dict]:
    """The primary metric per example group the eval split out (handbook-qa's fact_in_train: what finetuning
    could have seen): {field: {value: {score, ci95, n}}}."""
    return {field: {value: m[primary] for value, m in groups.items() if primary in m}
            for field, groups in (meta.get("groups") or {}).items()}


def train_recipe(task: Task, model: str, steps: int, out: str | Path, raft=None) -> Recipe:
    """The recipe the LoRA rungs train when no adapter is given: TRAIN_RECIPE on `task` for `steps` steps
    (on `raft`'s retrieval-aware rows instead of the task's own when given: a tunelab.rag.raft.RaftData)."""
    data = [f"data.task={task.dir}"] if raft is None else \
        ["data.task=null", f"data.train={raft.train}", f"data.validation={raft.validation}"]
    return load_recipe(None, [f"model.spec={model}", *data, *TRAIN_RECIPE, f"train.max_steps={steps}",
                              f"validation.every={steps}", f"output_dir={out}"])


def _train(task: Task, model: str, steps: int, out: Path, raft=None) -> tuple[Path, float]:
    from tunelab.train import train

    recipe = train_recipe(task, model, steps, out, raft)
    t0 = time.time()
    how = "" if raft is None else (f" on retrieved passages (RAFT: k={raft.info['k']}, "
                                   f"{raft.info['no_gold']:.0%} of rows without the gold passage)")
    log.info(f"training a LoRA adapter for the LoRA rungs ({steps} steps{how}) -> {out}", extra={"style": "bold"})
    return Path(train(recipe)), time.time() - t0


def run_ladder(task: str | Path | Task, model: str = DEFAULT_MODEL, out: str | Path | None = None,
               rungs: list[str] | None = None, target: str | None = None, split: str = "test",
               limit: int | None = None, few_shot: int = 3, k: int = 3, adapter: str | Path | None = None,
               train_steps: int = 80, corpus: str | Path | None = None, dtype: str = "auto",
               device: str = "auto", engine=None, load_in: str | None = None, rerank=None) -> LadderResult:
    """Run the ladder on `task` and write ladder.json + ladder.html into `out`; see the module docstring.
    `engine`: an Engine to use instead of loading `model` (tests pass a FakeEngine). load_in: 8bit | 4bit
    runs every rung on bitsandbytes-quantized base weights (the LoRA rung's adapter trains unquantized).
    rerank: turns on the optional hybrid+rerank rung and says with what: "judge" (the base model as a
    relevance judge, also the default when the rung is named in `rungs`), a local cross-encoder folder, or a
    tunelab.rag.rerank.Reranker."""
    t = task if isinstance(task, Task) else load_task(task)
    t.examples(split, limit=1)  # a bad split fails before any model loads
    if adapter is not None and not (Path(adapter) / ADAPTER_CONFIG).is_file():
        raise TunelabError(f"--adapter {adapter}: not a PEFT adapter folder (no {ADAPTER_CONFIG}); give the folder "
                           "`tunelab train` wrote, or leave --adapter out and the ladder trains one.")
    goal = Target.parse(target) if target else None
    corpus_path = _corpus(t, corpus)
    has_train = "train" in t.spec.splits
    plan = plan_rungs(t.schema() is not None, corpus_path is not None, adapter is not None or has_train, rungs,
                      has_train, optional=rerank is not None)
    out_dir = Path(out or f"runs/ladder-{t.name}")
    primary = primary_metric(t)
    engine = engine or load_engine(model, dtype=dtype, device=device, load_in=load_in)
    indexes: dict[str, object] = {}
    adapter_path, train_s = (Path(adapter) if adapter else None), None
    results: list[RungResult] = []
    skipped = dict(plan.skipped)
    rag_lora = next((r for r in plan.rungs if r.rag and r.lora), None)

    def index_for(kind: str):
        from tunelab.rag import build_index

        if kind not in indexes:
            indexes[kind] = build_index(corpus_path, out_dir / f"index-{kind}", kind=kind)
        return indexes[kind]

    for i, rung in enumerate(plan.rungs):
        log.info(f"rung {i + 1}/{len(plan.rungs)}: {rung.label}", extra={"rule": True})
        if rung.lora and ADAPTER not in engine.adapters:
            if adapter_path is None:  # with a RAG + LoRA rung, one adapter trained on retrieved passages
                raft = _raft(t, index_for(rag_lora.rag), out_dir, k) if rag_lora and corpus_path else None
                adapter_path, train_s = _train(t, model, train_steps, out_dir / "adapter", raft)
            engine.add_adapter(ADAPTER, str(adapter_path))
        augment = None
        if rung.rag:  # the passages go into the prompt through tunelab.rag's one template
            from tunelab.rag import retrieval_augment

            index = index_for(rung.rag)
            if rung.rerank:
                from tunelab.rag.rerank import load_reranker

                index = index.with_reranker(load_reranker(rerank or "judge", engine))
            augment = retrieval_augment(index, t, split, limit, k)
        results.append(_run_rung(engine, t, rung, out_dir, split, limit, few_shot, augment, model, primary,
                                 adapter_path, train_s))
        r = results[-1]
        log.info(f"{rung.label}: {primary} {r.score:.3f} (95% CI {r.ci95[0]:.3f}-{r.ci95[1]:.3f}), "
                 f"failures {r.failures}")
        if goal and goal.met(r):
            for later in plan.rungs[i + 1:]:
                skipped[later.name] = f"not run: {rung.name} met the target {goal}"
            break
    rec = recommend(results, goal, primary)
    res = LadderResult(out_dir, t.name, primary, results, rec, skipped)
    res.report = write_ladder(res)
    register_folder("ladder", out_dir, {r.name: str((out_dir / "rungs" / r.name).resolve()) for r in results},
                    meta={"task": t.name, "verdict": rec.verdict, "rung": rec.rung})
    return res


def _raft(t: Task, index, out_dir: Path, k: int):
    """Retrieval-aware rows (tunelab.rag.raft) for the ladder's LoRA, when the task's examples name their gold
    documents; None (train closed-book) when they do not."""
    from tunelab.rag.raft import raft_data

    if not all(ex.get("doc_id") for ex in t.examples("train", limit=8)):
        log.info("the RAG + LoRA rung's adapter trains closed-book: the task's train examples have no doc_id")
        return None
    return raft_data(index, t, out_dir / "raft-data", k=k)


def _run_rung(engine, t: Task, rung: Rung, out_dir: Path, split: str, limit, few_shot: int, augment, model,
              primary: str, adapter_path, train_s) -> RungResult:
    variant = Variant(rung.name, ADAPTER if rung.lora else None, str(adapter_path) if rung.lora else None,
                      rung.constrained)
    with PeakRSS() as mem:
        run_variants(engine, t, [variant], out_dir / "rungs", split, limit,
                     few_shot=few_shot if rung.few_shot else 0, augment=augment, model_label=model,
                     write_html=False)
    meta, rows = read_eval_folder(out_dir / "rungs" / rung.name)
    scores = [float(row["scores"][primary]) for row in rows]
    return RungResult(rung.name, rung.label, rung.cost, meta["metrics"], scores, meta["failures"],
                      latency_s=meta["generation_seconds"] / max(1, len(rows)), peak_rss_mb=round(mem.mb, 1),
                      train_seconds=round(train_s, 1) if rung.lora and train_s else None,
                      groups=_groups(meta, primary))
