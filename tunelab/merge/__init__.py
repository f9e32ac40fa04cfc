"""Merge LoRA adapters (PEFT) or full models and task vectors (mergekit, an optional extra); storage reports."""

from tunelab.merge.adapters import METHODS, MergeResult, merge_adapters, unload_adapter
from tunelab.merge.dispatch import merge
from tunelab.merge.models import METHODS as MODEL_METHODS
from tunelab.merge.models import build_config, merge_models
from tunelab.merge.storage import StorageReport, storage_report

__all__ = ["METHODS", "MODEL_METHODS", "MergeResult", "StorageReport", "build_config", "merge", "merge_adapters",
           "merge_models", "storage_report", "unload_adapter"]
