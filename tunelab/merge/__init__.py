"""Merge PEFT adapters on one base (PEFT's add_weighted_adapter) or into the base itself, with a storage report."""

from tunelab.merge.adapters import METHODS, MergeResult, merge, merge_adapters, unload_adapter
from tunelab.merge.storage import StorageReport, storage_report

__all__ = ["METHODS", "MergeResult", "StorageReport", "merge", "merge_adapters", "storage_report",
           "unload_adapter"]
