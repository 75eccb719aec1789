"""The model families of the DiNAT / NAT classification release, registered in timm on import."""

from . import dinat_s, isotropic, nat
from ._common import ClassifierMixin, HierarchicalModel, NATBlock, Stage
from .dinat_s import DiNATs
from .isotropic import IsotropicModel, RelPosSelfAttention
from .nat import NAT

MODEL_NAMES = (
    "nat_mini",
    "nat_tiny",
    "nat_small",
    "nat_base",
    "dinat_nano",
    "dinat_mini",
    "dinat_tiny",
    "dinat_small",
    "dinat_base",
    "dinat_large",
    "dinat_large_384",
    "dinat_large_384_11x11",
    "dinat_large_21k",
    "dinat_large_21k_11x11",
    "dinat_s_tiny",
    "dinat_s_small",
    "dinat_s_base",
    "dinat_s_large",
    "dinat_s_large_384",
    "dinat_s_large_21k",
    "nat_isotropic_small",
    "nat_isotropic_base",
    "dinat_isotropic_small",
    "dinat_isotropic_base",
    "vitrpb_small",
    "vitrpb_base",
)

__all__ = [
    "MODEL_NAMES",
    "NAT",
    "ClassifierMixin",
    "DiNATs",
    "HierarchicalModel",
    "IsotropicModel",
    "NATBlock",
    "RelPosSelfAttention",
    "Stage",
    "dinat_s",
    "isotropic",
    "nat",
]
