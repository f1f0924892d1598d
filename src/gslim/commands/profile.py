"""Placeholder being written now; replaced by the real 'profile' stage commands."""


def register(app) -> None:
    return None
