"""Progress on stderr: a bar on a terminal; otherwise (a log file, a pipe, a service) a short line every few
seconds, so logs stay readable and still show the rate and how far along the run is."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm


class Progress:
    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "img",
        enabled: bool = True,
        every_s: float = 5.0,  # seconds between lines when stderr is not a terminal
        stream: TextIO | None = None,
    ):
        self.stream = stream or sys.stderr
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.done = 0
        self.start = self.last_line = time.monotonic()
        self.enabled = enabled and total > 0
        tty = self.stream.isatty() if hasattr(self.stream, "isatty") else False
        self.bar = None
        if self.enabled and tty:
            self.bar = tqdm(total=total, unit=unit, desc=desc, file=self.stream, smoothing=0.1)

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.monotonic() - self.last_line >= self.every_s:
            self._line()

    def _line(self) -> None:
        self.last_line = time.monotonic()
        left = (self.total - self.done) / self.rate if self.rate else 0.0
        print(
            f"{self.desc}: {self.done:,}/{self.total:,} {self.unit}, {self.rate:.1f} {self.unit}/s, "
            f"{left:.0f}s left",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.done:
            self._line()
