"""Prometheus text exposition of the server's counters, written by hand (no client library needed)."""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)  # seconds


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)  # (method, route, status) -> n
        self.latency: dict[str, list[int]] = defaultdict(lambda: [0] * (len(BUCKETS) + 1))  # route -> counts
        self.latency_sum: dict[str, float] = defaultdict(float)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(method, route, status)] += 1
            self.latency[route][bisect.bisect_left(BUCKETS, seconds)] += 1
            self.latency_sum[route] += seconds

    def render(self, gauges: dict[str, float]) -> str:
        lines = ["# TYPE retrieval_requests_total counter"]
        with self.lock:
            for (method, route, status), n in sorted(self.requests.items()):
                lines.append(
                    f'retrieval_requests_total{{method="{method}",route="{route}",status="{status}"}} {n}'
                )
            lines.append("# TYPE retrieval_request_seconds histogram")
            for route, counts in sorted(self.latency.items()):
                total = 0
                for bound, n in zip((*BUCKETS, "+Inf"), counts, strict=True):
                    total += n
                    lines.append(f'retrieval_request_seconds_bucket{{route="{route}",le="{bound}"}} {total}')
                lines.append(
                    f'retrieval_request_seconds_sum{{route="{route}"}} {self.latency_sum[route]:.6f}'
                )
                lines.append(f'retrieval_request_seconds_count{{route="{route}"}} {total}')
        for name, value in gauges.items():
            lines += [f"# TYPE retrieval_{name} gauge", f"retrieval_{name} {value}"]
        return "\n".join(lines) + "\n"
