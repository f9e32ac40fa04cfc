"""Read data formats -> chat messages, check files, tokenise with loss weights, pack into batches."""

from tunelab.data.check import CheckReport, check_file
from tunelab.data.formats import RowError, detect_format, prompt_messages, to_messages
from tunelab.data.pack import Batches, collate, first_fit_decreasing, model_inputs
from tunelab.data.read import ChatDataset, iter_jsonl, read_chat_file, read_jsonl
from tunelab.data.tokenize import ChatTokenizer, Example, TokenizeStats, tokenize_chat, tokenize_dataset

__all__ = [
    "Batches", "ChatDataset", "ChatTokenizer", "CheckReport", "Example", "RowError", "TokenizeStats", "check_file",
    "collate", "detect_format", "first_fit_decreasing", "iter_jsonl", "model_inputs",
    "prompt_messages", "read_chat_file", "read_jsonl", "to_messages", "tokenize_chat",
    "tokenize_dataset",
]
