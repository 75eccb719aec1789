"""Vectorised CPU kernels (work in progress)."""


def available(x=None) -> bool:
    return False


def unavailable_reason(x=None) -> str:
    return "not built yet"
