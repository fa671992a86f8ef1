"""`train(config)`: one slider run, start to finish, and the names callers import with it.

The run is slider_cn/recipe.py's `SliderRecipe`, read top to bottom there: config -> data
backends -> model components -> slider adapter on the trainable side -> sampler -> for each
micro-batch: encode (from cache), slider step, optimizer step -> checkpoints -> final outputs.
`preflight` and `check_conditioning` are the refusals it makes before any work (the dry run
makes them too); `TrainingError` is a run that cannot continue, `TrainResult` a finished one.
"""

from __future__ import annotations

from slider_cn.config import TrainConfig
from slider_cn.recipe import (
    SliderRecipe,
    TrainingError,
    TrainResult,
    check_conditioning,
    preflight,
)

__all__ = ["TrainResult", "TrainingError", "check_conditioning", "preflight", "train"]


def train(config: TrainConfig) -> TrainResult:
    """Train a slider; return where its files are and the trained objects."""
    recipe = SliderRecipe(config)
    try:
        recipe.setup()
        recipe.train()
        return recipe.save()
    finally:
        recipe.cleanup()
