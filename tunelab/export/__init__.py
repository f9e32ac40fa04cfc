"""Export models and adapters: HF folders, GGUF (full model and LoRA), Ollama Modelfiles, vLLM adapter folders."""

from tunelab.export.export import FORMATS, ExportResult, export
from tunelab.models.gguf_write import QUANTS

__all__ = ["FORMATS", "QUANTS", "ExportResult", "export"]
