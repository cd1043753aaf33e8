"""Errors the CLI turns into one-line messages and exit codes (DESIGN.md: 2 bad usage/input, 1 runtime)."""


class UserError(Exception):
    """Bad input or bad usage: the message names the file or value and what to do. Exit status 2."""


class RuntimeFailure(Exception):
    """Something went wrong while doing valid work. Exit status 1."""
