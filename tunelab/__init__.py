"""tunelab: decide whether to finetune, with numbers; then train, evaluate and ship."""

__version__ = "0.1.0"
