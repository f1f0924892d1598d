"""Placeholder being written now; replaced by the real 'export' stage commands."""


def register(app) -> None:
    return None
