"""The training recipe schema: one pydantic model, YAML on disk, `key=value` overrides, defaults here only.

Defaults are the guide's "Recommended defaults" (LoRA on attention+MLP, r = alpha = 32, dropout 0.05,
AdamW lr 2e-4, cosine, 3% warmup, 3 epochs, prompt loss weight 0.1, packing on, bf16 where supported),
with a CPU-sized sequence length and batch.
"""

from __future__ import annotations

import difflib
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunelab.config.paths import DEFAULT_MODEL
from tunelab.errors import TunelabError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class RopeScaling(_Section):
    """Stretch the rotary position embedding for a longer context (transformers' `rope_parameters`)."""

    type: Literal["linear", "dynamic", "yarn"]
    factor: float = Field(gt=1.0)  # new context / pretraining context


class ModelConfig(_Section):
    spec: str = DEFAULT_MODEL
    dtype: Literal["checkpoint", "auto", "bf16", "fp16", "fp32"] = "checkpoint"
    chat_template: str | None = None  # a .jinja file or `chatml`, replacing the model's (`--chat-template`)
    rope_scaling: RopeScaling | None = None


class MixSource(_Section):
    """One dataset of `data.mix`: a task (name or folder) or a JSONL file, and its share of the train rows."""

    task: str | None = None
    path: str | None = None  # a training JSONL file (any format tunelab reads)
    validation: str | None = None  # its validation file (default: data.validation_fraction of `path`)
    weight: float = Field(gt=0)

    @model_validator(mode="after")
    def _one_source(self) -> MixSource:
        if (self.task is None) == (self.path is None):
            raise ValueError("each data.mix entry gives exactly one of task: or path:, with weight:")
        return self


class DataConfig(_Section):
    task: str | None = "orders-json"  # a bundled task name; or give train/validation files
    train: str | None = None
    validation: str | None = None
    # several datasets with mixing weights, e.g. [{task: orders-json, weight: 0.8}, {path: general.jsonl,
    # weight: 0.2}]: train rows are sampled (seeded by train.seed, no row twice) in those proportions
    mix: list[MixSource] | None = Field(None, min_length=1)
    validation_fraction: float = Field(0.05, ge=0.0, lt=1.0)  # carved off train when no validation file
    limit_train: int | None = None
    limit_validation: int | None = 64
    too_long: Literal["truncate", "drop"] = "truncate"
    # an index folder (`tunelab rag index`): train on each question with the passages it retrieves (RAFT,
    # tunelab.rag.raft), rag_k of them, rag_no_gold of the rows without the gold passage; needs data.task
    rag: str | None = None
    rag_k: int = Field(3, ge=1)
    rag_no_gold: float = Field(0.2, ge=0.0, lt=1.0)

    def held_out(self, rows: int) -> int:
        """Rows carved off `rows` training rows for validation when no validation file is given."""
        return max(1, int(round(rows * self.validation_fraction))) if self.validation_fraction else 0

    @model_validator(mode="after")
    def _source(self) -> DataConfig:
        if self.mix is not None:
            given = [k for k in ("train", "validation") if getattr(self, k) is not None]
            if "task" in self.model_fields_set and self.task is not None:
                given.insert(0, "task")
            if given:
                raise ValueError(f"data.mix replaces data.{', data.'.join(given)}: put every dataset in the mix")
            self.task = None
        elif self.task is None and self.train is None:
            raise ValueError("give data.task (a bundled task), data.train (a JSONL file) or data.mix")
        if self.rag is not None and self.mix is not None:
            raise ValueError("data.rag trains one task on retrieved passages; it does not combine with data.mix")
        return self


LORA_TARGETS = {
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "attention+mlp": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qv": ["q_proj", "v_proj"],
}


class LoraConfig(_Section):
    r: int = Field(32, ge=1)
    alpha: float = 32
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    targets: str | list[str] = "attention+mlp"
    use_dora: bool = False
    plus_ratio: float | None = Field(None, gt=0)  # LoRA+: the B matrices learn at plus_ratio x train.lr
    # decoder layers to adapt (PEFT layers_to_transform): N = the last N, or a list of indices; None = all.
    # Backward stops at the lowest adapted layer: 80 demo steps on the last 15 of 30 layers took 172 s, not 298.
    layers: int | list[int] | None = None

    def target_modules(self) -> list[str]:
        if isinstance(self.targets, list):
            return list(self.targets)
        if self.targets not in LORA_TARGETS:
            raise TunelabError(
                f"lora.targets={self.targets!r} is not a preset; use one of {sorted(LORA_TARGETS)} "
                "or an explicit list such as [q_proj, v_proj]."
            )
        return list(LORA_TARGETS[self.targets])

    def layer_indices(self, n_layers: int) -> list[int] | None:
        """The decoder layer indices `layers` names in a model of `n_layers` layers (None: all of them)."""
        if self.layers is None:
            return None
        if isinstance(self.layers, int):
            picked, ok = list(range(n_layers - self.layers, n_layers)), 1 <= self.layers <= n_layers
        else:
            picked = sorted(set(self.layers))
            ok = bool(picked) and all(0 <= i < n_layers for i in picked)
        if not ok:
            raise TunelabError(f"lora.layers={self.layers!r}: this model has {n_layers} decoder layers (0-"
                               f"{n_layers - 1}); give a count from 1 to {n_layers} or a list of indices in range.")
        return picked


class QLoraConfig(_Section):
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"


class PromptConfig(_Section):
    num_virtual_tokens: int = Field(20, ge=1)
    init_text: str | None = "Extract the requested fields and answer in the required format."


class TrainConfig(_Section):
    epochs: float = Field(3.0, gt=0)
    max_steps: int | None = None  # overrides epochs when set
    lr: float = Field(2e-4, gt=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0
    batch_size: int = Field(4, ge=1)  # per device, in packed sequences when packing is on
    grad_accum: int | None = None  # derived from effective_batch when unset
    effective_batch: int | None = 8  # target: batch_size x grad_accum x processes
    max_length: int = Field(512, ge=8)
    packing: bool = True
    # packing: a prompt prefix (>= this many tokens) that all examples of a micro-batch share is computed once
    # per micro-batch; loss and gradients are unchanged (tunelab.data.pack). 0 turns it off.
    share_prefix: int = Field(16, ge=0)
    prompt_loss_weight: float = Field(0.1, ge=0.0, le=1.0)
    grad_checkpointing: bool = False
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw", "sgd"] = "adamw"
    freeze_embeddings: bool = False  # full finetuning only
    compile: bool = False  # torch.compile each decoder layer (fuses norms, rotary, SiLU, LoRA adds)
    seed: int = 0
    threads: int | None = None  # torch CPU threads; None = all cores
    # tunelab's CPU fast paths (fused LoRA/MLP/norm, packed attention, arena, fused head: tunelab.fast):
    # auto = on for a CPU, off elsewhere until measured on a GPU; off = plain transformers + PEFT, where packing
    # makes rows of max_length whose examples transformers masks apart by position ids (docs/cpu-training.md)
    fast_paths: Literal["auto", "on", "off"] = "auto"

    @field_validator("fast_paths", mode="before")
    @classmethod
    def _yaml_on_off(cls, v: Any) -> Any:
        """YAML 1.1 reads a bare on / off as true / false."""
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


class ValidationConfig(_Section):
    """In-training validation loss (recipe section `validation:`; `tunelab eval` is the task evaluation)."""

    every: int | None = 50  # validate every N optimizer steps (None: at the end only)
    patience: int | None = None  # early stopping: stop after N validations without improvement


class LintConfig(_Section):
    """Lint warnings this recipe accepts on purpose (recipe section `lint:`), each with its reason.

    `allow: [lr-range, batch-unstable]` (the reason in a YAML comment) or `allow: {lr-range: "short run"}`.
    An allowed warning is still reported, as `allowed`, with the reason; errors cannot be allowed.
    """

    allow: dict[str, str] = {}

    @field_validator("allow", mode="before")
    @classmethod
    def _list_form(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]
        return {str(code): "" for code in v} if isinstance(v, list | tuple) else v


class RagConfig(_Section):
    """How a retrieval index is built and searched (`tunelab rag index`; recorded in its index.json)."""

    kind: Literal["bm25", "dense", "hybrid"] = "hybrid"
    # chunks are windows of the embedder's own tokens (so a chunk fits its window), overlapping by `overlap`
    chunk_tokens: int = Field(200, ge=8)
    overlap: int = Field(40, ge=0)
    stemmer: str | None = None  # BM25: a PyStemmer language such as "english"; None = no stemming
    # dense: the embedder's compute dtype (tunelab.rag.embed.EMBED_DTYPES); bfloat16 is faster on CPUs with
    # AVX512-BF16 or AMX, its vectors are close to float32's, not identical
    embed_dtype: Literal["float32", "bfloat16"] = "float32"
    candidates: int = Field(50, ge=1)  # hybrid / reranker: each retriever's top-N before fusing
    rrf_k: int = Field(60, ge=1)  # reciprocal-rank fusion: score = sum 1 / (rrf_k + rank)
    k: int = Field(5, ge=1)  # passages a query returns

    @model_validator(mode="after")
    def _overlap_below_window(self) -> RagConfig:
        if self.overlap >= self.chunk_tokens:
            raise ValueError(f"overlap ({self.overlap}) must be smaller than chunk_tokens ({self.chunk_tokens})")
        return self


class Recipe(_Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    method: Literal["lora", "dora", "qlora", "prompt", "full"] = "lora"  # see tunelab.models.methods.METHODS
    lora: LoraConfig = LoraConfig()
    qlora: QLoraConfig = QLoraConfig()
    prompt: PromptConfig = PromptConfig()
    train: TrainConfig = TrainConfig()
    validation: ValidationConfig = ValidationConfig()
    lint: LintConfig = LintConfig()
    output_dir: str = "runs/latest"
    checkpoint_every: int | None = 100
    keep_last: int = Field(2, ge=1)
    # mirror the finished run (params, per-step metrics, dataset digest, adapter) to these trackers; the
    # registry ($TUNELAB_HOME/registry.sqlite) stays the source of truth for lineage
    report_to: list[Literal["mlflow"]] = []
    mlflow_tracking_uri: str | None = None  # e.g. sqlite:///mlflow.db; None: MLFLOW_TRACKING_URI or mlflow's default

    @model_validator(mode="before")
    @classmethod
    def _old_eval_key(cls, data: Any) -> Any:
        """Recipes written before the rename say `eval:`; read it as `validation:` and say so."""
        if isinstance(data, dict) and "eval" in data:
            if "validation" in data:
                raise ValueError("give `validation:` only (`eval:` is its old name)")
            warnings.warn("recipe section `eval:` is now `validation:` (in-training validation; `tunelab eval` "
                          "is the task evaluation): rename it, the old name will stop working", FutureWarning,
                          stacklevel=2)
            data = {("validation" if k == "eval" else k): v for k, v in data.items()}
        return data

    def accumulation(self, processes: int = 1) -> int:
        """Gradient accumulation steps: explicit, or derived from the effective batch target."""
        t = self.train
        if t.grad_accum is not None:
            return t.grad_accum
        if t.effective_batch is None:
            return 1
        return max(1, round(t.effective_batch / (t.batch_size * processes)))

    def fit_to_data(self, sequences: int, processes: int = 1) -> tuple[Recipe, str | None]:
        """This recipe with its batch fitted to `sequences` training sequences (packed rows), and a note saying
        what changed; (self, None) when one optimizer step of batch_size x grad_accum x processes fits already.

        Small data trains out of the box: the per-device batch, then the accumulation, shrink until one step
        takes at most every sequence once."""
        t, accum = self.train, self.accumulation(processes)
        step = t.batch_size * accum * processes
        if sequences >= step:
            return self, None
        if sequences < processes:
            raise TunelabError(f"only {sequences} training sequence(s) for {processes} processes: each process "
                               "needs at least one; add data or launch fewer processes.")
        batch = min(t.batch_size, sequences // processes)
        accum = max(1, min(accum, sequences // (batch * processes)))
        fitted = self.model_copy(update={"train": t.model_copy(update={"batch_size": batch, "grad_accum": accum})})
        note = (f"small data: {sequences} training sequence(s), fewer than one optimizer step of batch_size x "
                f"grad_accum x processes = {t.batch_size} x {self.accumulation(processes)} x {processes} = {step}; "
                f"training with batch_size={batch} grad_accum={accum} (effective batch {batch * accum * processes})"
                ". The guide's effective batch of 64 or more needs more data.")
        return fitted, note


def _field_names(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _nearest(name: str, options: list[str]) -> str:
    near = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f"; did you mean {near[0]!r}?" if near else f"; valid names: {', '.join(options)}"


def _section_model(loc: tuple) -> type[BaseModel]:
    model: type[BaseModel] = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            break
    return model


def _explain(err: ValidationError, source: str) -> TunelabError:
    lines = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        dotted = ".".join(loc)
        if e["type"] == "extra_forbidden":
            options = _field_names(_section_model(loc))
            lines.append(f"unknown key {dotted!r}{_nearest(loc[-1], options)}")
        else:
            lines.append(f"{dotted or '(recipe)'}: {e['msg']}")
    return TunelabError(f"{source}: invalid recipe:\n  " + "\n  ".join(lines))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise TunelabError(f"override {item!r} is not key=value (for example train.lr=1e-4)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise TunelabError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return data


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe (or start from defaults), apply `key=value` overrides and validate."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise TunelabError(f"recipe {p} does not exist; see recipes/ for examples")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise TunelabError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise TunelabError(f"{p}: a recipe is a YAML mapping of sections (model:, data:, train: ...)")
    apply_overrides(data, overrides or [])
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise _explain(e, source) from None


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the resolved recipe as YAML (every field, defaults included)."""
    Path(path).write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
