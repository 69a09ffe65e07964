"""`safeprune eval` (filled in with the evaluation module)."""


def register(subparsers) -> None:
    pass
