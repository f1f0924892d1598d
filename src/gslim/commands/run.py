"""Placeholder being written now; replaced by the real 'run' stage commands."""


def register(app) -> None:
    return None
