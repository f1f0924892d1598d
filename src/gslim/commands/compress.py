"""Placeholder being written now; replaced by the real 'compress' stage commands."""


def register(app) -> None:
    return None
