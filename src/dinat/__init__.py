"""dinat: Dilated Neighborhood Attention Transformers on current PyTorch."""

from . import ops
from .layers import NeighborhoodAttention2D

__version__ = "0.1.0"
__all__ = ["NeighborhoodAttention2D", "ops", "__version__"]
