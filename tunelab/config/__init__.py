"""Typed configuration: recipes (YAML + key=value overrides), paths and defaults in one place."""

from tunelab.config.paths import tunelab_home
from tunelab.config.recipe import (
    DataConfig,
    EvalConfig,
    LoraConfig,
    ModelConfig,
    PromptConfig,
    QLoraConfig,
    Recipe,
    TrainConfig,
    load_recipe,
)

__all__ = [
    "DataConfig", "EvalConfig", "LoraConfig", "ModelConfig", "PromptConfig", "QLoraConfig",
    "Recipe", "TrainConfig", "load_recipe", "tunelab_home",
]
