"""Errors that the CLI turns into one line on stderr and exit code 2, and how their messages name
the user's settings: as flags on the command line (`--blocks 0:4`), as keywords in Python
(`blocks=(0, 4)`)."""
from __future__ import annotations

import contextlib
import contextvars
import shlex


class UsageError(ValueError):
    """Bad user input (argument, model, data source, missing package); the message names the fix."""


class NumericalError(RuntimeError):
    """A computation that cannot go on (Hessian that will not factor, NaN activations)."""


_COMMAND_LINE = contextvars.ContextVar("command_line", default=False)


@contextlib.contextmanager
def command_line_terms():
    """Within it, messages name settings as command-line flags (the CLI runs its commands so)."""
    token = _COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _COMMAND_LINE.reset(token)


def in_command_line() -> bool:
    return _COMMAND_LINE.get()


def flag(name: str) -> str:
    """The command-line flag of a setting: max_memory -> --max-memory."""
    return "--" + name.replace("_", "-")


def option(name: str) -> str:
    """A setting's name: `--max-memory` on the command line, `max_memory` in Python."""
    return flag(name) if in_command_line() else name


def setting(name: str, value=True) -> str:
    """A setting with its value, as the user writes it: `--device cpu` / `device='cpu'`, a switch
    (value True): `--overwrite` / `overwrite=True`."""
    if in_command_line():
        return option(name) if value is True else f"{option(name)} {shlex.quote(str(value))}"
    return f"{name}={value!r}"
