"""The one exception brq-convert raises for bad input (the CLI prints its message)."""


class ConvertError(ValueError):
    """A conversion that cannot proceed; the message says what to fix. OUT is left absent."""
