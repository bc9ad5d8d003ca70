"""Backbones behind one registry; every model returns `PoseOutput`."""

from h2ot.models import (
    dstformer,  # noqa: F401  (registers "dstformer")
    frameformer,  # noqa: F401  (registers "frameformer")
    mixste,  # noqa: F401  (registers "mixste")
    mlp,  # noqa: F401  (registers "mlp")
)
from h2ot.models.base import MODEL_REGISTRY, PoseOutput, build_model, predict, register_model

__all__ = ["MODEL_REGISTRY", "PoseOutput", "build_model", "predict", "register_model"]
