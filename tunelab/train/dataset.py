"""Turn a recipe's data section into tokenised, weighted train/validation examples."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.config.recipe import DataConfig
from tunelab.data import read_chat_file, tokenize_dataset
from tunelab.data.mix import sample_mix
from tunelab.errors import TunelabError
from tunelab.runs.layout import file_sha256
from tunelab.tasks import load_task


@dataclass
class Splits:
    train: list  # tokenised examples
    validation: list
    sources: dict = field(default_factory=dict)  # name -> {"path", "sha256"}
    stats: dict = field(default_factory=dict)


def _mixed(data: DataConfig, seed: int) -> tuple[list, list, dict]:
    """data.mix: each dataset loaded as if it were the only one, train rows sampled by weight (seeded),
    validation rows of all of them shuffled together; run.json records each source's share."""
    trains, vals, sources = [], [], {}
    for i, src in enumerate(data.mix):
        one = DataConfig(task=src.task, train=src.path, validation=src.validation,
                         validation_fraction=data.validation_fraction, limit_validation=None)
        train, val, files = load_conversations(one, seed)
        trains.append(train)
        vals += val
        for role, info in files.items():
            sources[f"{role}[{i}]"] = {**info, "weight": src.weight} if role == "train" else info
    mixed = sample_mix(trains, [s.weight for s in data.mix], seed)
    for i, train in enumerate(trains):
        sources[f"train[{i}]"].update(rows_available=len(train), mix_seed=seed, **mixed.record(i))
    random.Random(seed).shuffle(vals)
    return mixed.rows, vals, sources


def load_conversations(data: DataConfig, seed: int) -> tuple[list, list, dict]:
    """Chat-message rows for train and validation, and the files they came from."""
    sources = {}
    if data.mix is not None:
        train, val, sources = _mixed(data, seed)
    elif data.train is not None:
        train = read_chat_file(Path(data.train)).rows
        sources["train"] = {"path": str(data.train), "sha256": file_sha256(Path(data.train))}
        if data.validation is not None:
            val = read_chat_file(Path(data.validation)).rows
            sources["validation"] = {"path": str(data.validation), "sha256": file_sha256(Path(data.validation))}
        else:  # carve a validation split off train, deterministically
            rows = list(train)
            random.Random(seed).shuffle(rows)
            n_val = data.held_out(len(rows))
            val, train = rows[:n_val], rows[n_val:]
    else:
        task = load_task(data.task)
        train = [task.messages(ex, with_answer=True) for ex in task.examples("train")]
        val = [task.messages(ex, with_answer=True) for ex in task.examples("validation")]
        for split in ("train", "validation"):
            p = task.split_path(split)
            sources[split] = {"path": str(p), "sha256": file_sha256(p), "task": task.name}
    if data.limit_train:
        train = train[: data.limit_train]
    if data.limit_validation:
        val = val[: data.limit_validation]
    return train, val, sources


def prepare_splits(data: DataConfig, tokenizer, prompt_loss_weight: float, max_length: int,
                   seed: int) -> Splits:
    """Load, tokenise with loss weights, and report truncation; error on an empty dataset."""
    train_rows, val_rows, sources = load_conversations(data, seed)
    train, train_stats = tokenize_dataset(tokenizer, train_rows, prompt_loss_weight, max_length, data.too_long)
    val, val_stats = tokenize_dataset(tokenizer, val_rows, prompt_loss_weight, max_length, data.too_long)
    if not train:
        raise TunelabError(
            f"the training set is empty after filtering ({train_stats}); check data.train / data.task, "
            f"and raise train.max_length (now {max_length}) or set data.too_long=truncate."
        )
    return Splits(train, val, sources, {"train": train_stats, "validation": val_stats})
