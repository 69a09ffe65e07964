"""`safeprune toy ...` (filled in with the toy teacher and judge builders)."""


def register(subparsers) -> None:
    pass
