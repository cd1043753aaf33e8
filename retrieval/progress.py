"""Progress on stderr: a tqdm bar on a terminal; a short line every few seconds when stderr is a file or a pipe, so
a log file gets a readable trace instead of thousands of carriage-return frames."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

LOG_EVERY_S = 5.0  # seconds between lines when stderr is not a terminal


class LineProgress:
    """The part of tqdm's interface the toolkit uses (update, set_postfix, close, iteration), as log lines."""

    def __init__(self, iterable: Iterable | None, total: int | None, desc: str, unit: str, initial: int = 0):
        self.iterable, self.desc, self.unit = iterable, desc, unit
        self.total = total if total is not None else _len(iterable)
        self.n, self.start, self.postfix = initial, time.monotonic(), ""
        self._initial, self._last = initial, self.start

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= LOG_EVERY_S:
            self._last = now
            self._write(now)

    def set_postfix(self, values: dict[str, Any] | None = None, **kw: Any) -> None:
        items = {**(values or {}), **kw}
        self.postfix = " ".join(f"{k}={v}" for k, v in items.items())

    def close(self) -> None:
        if self.n > self._initial and self._last == self.start:  # short runs still leave one line
            self._write(time.monotonic())
            self._last = -1.0

    def _write(self, now: float) -> None:
        rate = (self.n - self._initial) / max(now - self.start, 1e-9)
        of = f"/{self.total}" if self.total else ""
        line = f"{self.desc}: {self.n}{of} {self.unit} ({rate:.1f} {self.unit}/s)"
        print(f"{line} {self.postfix}".rstrip(), file=sys.stderr, flush=True)


def _len(iterable: Iterable | None) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


def progress_bar(
    iterable: Iterable | None = None,
    desc: str = "",
    unit: str = "it",
    enabled: bool = True,
    total: int | None = None,
    initial: int = 0,
):
    """tqdm on a terminal, LineProgress elsewhere, a silent tqdm when disabled."""
    from tqdm import tqdm

    if enabled and not sys.stderr.isatty():
        return LineProgress(iterable, total, desc, unit, initial)
    return tqdm(
        iterable,
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        disable=not enabled,
        leave=False,
    )
