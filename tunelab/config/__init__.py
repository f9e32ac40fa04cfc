"""Typed configuration: recipes (YAML + key=value overrides), paths and defaults in one place."""

from tunelab.config.paths import tunelab_home
from tunelab.config.recipe import (
    DataConfig,
    LoraConfig,
    ModelConfig,
    PromptConfig,
    QLoraConfig,
    Recipe,
    TrainConfig,
    ValidationConfig,
    load_recipe,
)

__all__ = [
    "DataConfig", "LoraConfig", "ModelConfig", "PromptConfig", "QLoraConfig",
    "Recipe", "TrainConfig", "ValidationConfig", "load_recipe", "tunelab_home",
]
