"""dinat: Dilated Neighborhood Attention Transformers on current PyTorch."""

from . import checkpoints, flops, models, ops
from .factory import create_model, list_models
from .layers import NeighborhoodAttention2D

__version__ = "0.1.0"
__all__ = [
    "NeighborhoodAttention2D",
    "checkpoints",
    "create_model",
    "flops",
    "list_models",
    "models",
    "ops",
    "__version__",
]
