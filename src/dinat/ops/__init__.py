"""Neighborhood attention ops with NATTEN's (0.14-0.17) functional API, relative positional bias
included. See :mod:`dinat.ops.functional`."""

from .functional import (
    BACKENDS,
    as_pair,
    current_backend,
    na2d,
    na2d_av,
    na2d_qk,
    na2d_qkvpacked,
    requested_backend,
    use_backend,
)

__all__ = [
    "BACKENDS",
    "as_pair",
    "current_backend",
    "na2d",
    "na2d_av",
    "na2d_qk",
    "na2d_qkvpacked",
    "requested_backend",
    "use_backend",
]
