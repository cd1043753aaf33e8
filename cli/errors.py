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
        from retrieval.lifecycle import EXIT_INTERRUPTED, Interrupted, stop_signals

        try:
            with stop_signals():  # SIGTERM stops a command the way Ctrl-C does
                return fn(*args, **kwargs)
        except (UserError, CollectionError) as e:
            fail(str(e), 2)
        except RuntimeFailure as e:
            fail(str(e), 1)
        except Interrupted as e:
            typer.echo(f"interrupted: {e}", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: nothing was left half-written", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper
