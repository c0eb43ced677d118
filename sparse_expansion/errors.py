"""Errors that the CLI turns into one line on stderr and exit code 2."""


class UsageError(ValueError):
    """Bad user input (argument, model, data source, missing package); the message names the fix."""


class NumericalError(RuntimeError):
    """A computation that cannot go on (Hessian that will not factor, NaN activations)."""
