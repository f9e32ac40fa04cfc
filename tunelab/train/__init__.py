"""Supervised finetuning: LoRA, QLoRA, soft prompts and full finetuning on Accelerate."""

from tunelab.train.sft import train

__all__ = ["train"]
