"""flex_attention backend (work in progress)."""


def available(x) -> bool:
    return False


def unavailable_reason(x) -> str:
    return "not implemented yet"
