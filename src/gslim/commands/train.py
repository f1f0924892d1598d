"""Placeholder being written now; replaced by the real 'train' stage commands."""


def register(app) -> None:
    return None
