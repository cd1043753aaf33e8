"""Known failures become one line on stderr and an exit code (2 bad input, 1 runtime); bugs keep their traceback."""

from __future__ import annotations

import functools

import typer


def fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from indexes.errors import CollectionError
        from retrieval.errors import RuntimeFailure, UserError

        try:
            return fn(*args, **kwargs)
        except (UserError, CollectionError) as e:
            fail(str(e), 2)
        except RuntimeFailure as e:
            fail(str(e), 1)
        except KeyboardInterrupt:
            typer.echo(
                "interrupted: everything committed so far is kept; run the command again to resume", err=True
            )
            raise typer.Exit(130) from None

    return wrapper
