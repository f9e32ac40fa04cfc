"""The one owner of artifact formats (run, eval, merge, export, index, ladder folders) and the SQLite registry."""

from tunelab.runs import layout
from tunelab.runs.lineage import compare, depends_on, lineage, list_artifacts, roots, show
from tunelab.runs.record import (
    record_distilled,
    record_eval,
    record_index,
    record_training_run,
    register_any,
    register_base_model,
    register_distilled,
    register_eval,
    register_folder,
    register_index,
    register_training_run,
)
from tunelab.runs.registry import SCHEMA_VERSION, connect, registry_path

__all__ = [
    "SCHEMA_VERSION", "compare", "connect", "depends_on", "layout", "lineage", "list_artifacts", "record_distilled",
    "record_eval", "record_index", "record_training_run", "register_any", "register_base_model",
    "register_distilled", "register_eval", "register_folder", "register_index", "register_training_run",
    "registry_path", "roots", "show",
]
