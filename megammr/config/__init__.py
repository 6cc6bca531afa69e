"""Typed recipes: the schema (the ONLY place defaults live), the cross-field rules, the loader.

Imports go one way: cli -> load -> rules -> schema (rules also read megammr.backbones, which sits
below config). This package re-exports the public names, so `from megammr.config import Recipe,
load_recipe, RecipeError, ...` is what the rest of megammr writes.
"""
from megammr.config.load import field_docs, load_recipe, parse_override, to_dict, to_yaml, validate
from megammr.config.rules import cross_checks, layout_errors
from megammr.config.schema import (TOOLS, AlgoConfig, CurateConfig, DataConfig, DatasetConfig, ModelConfig, OptimConfig,
                                   ParallelConfig, PhaseConfig, Recipe, RecipeError, RecipeWarning, RewardConfig,
                                   RolloutConfig, ToolDefaults, TrainConfig)

__all__ = [
    "AlgoConfig", "CurateConfig", "DataConfig", "DatasetConfig", "ModelConfig", "OptimConfig", "ParallelConfig", "PhaseConfig",
    "Recipe", "RecipeError", "RecipeWarning", "RewardConfig", "RolloutConfig", "TOOLS", "ToolDefaults",
    "TrainConfig", "cross_checks", "field_docs", "layout_errors", "load_recipe", "parse_override", "to_dict",
    "to_yaml", "validate",
]
