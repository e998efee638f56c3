"""The one exception type this library raises for bad input."""


class BatchNormError(ValueError, TypeError):
    """Raised for an argument that `eqx_batchnorm` refuses.

    Both a `ValueError` and a `TypeError`, so that either `except` catches it. The message
    names the argument, what was expected, what was given, and how to fix it.
    """


def fail(argument: str, expected: str, given: object, fix: str) -> BatchNormError:
    """Builds (does not raise) the error for `argument`, in the library's one format."""
    return BatchNormError(f"`{argument}`: expected {expected}, but got {given}. Fix: {fix}")
