"""The one exception type users see for bad input: a message that says what is wrong and how to fix it."""


class SafepruneError(ValueError):
    """Bad input or an unsupported setup. Raised before anything is written."""
