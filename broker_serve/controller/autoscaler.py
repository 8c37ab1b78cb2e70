"""The autoscaling policy of one deployment: from load samples to a number of replicas.

Load is what waits in the deployment's queue (from RabbitMQ) plus what its replicas run (from
their heartbeats). The policy averages it over `look_back_period_s`, divides by
`target_ongoing_requests`, moves the current number that far times the up- or downscaling factor,
and acts once the wish has held for `upscale_delay_s` or `downscale_delay_s`. From zero replicas
it acts at once: a request is waiting. See docs/architecture.md, "Autoscaling".
"""

from __future__ import annotations

import math
from collections import deque

from ..config import AutoscalingConfig


class Autoscaler:
    def __init__(self, config: AutoscalingConfig, target: int) -> None:
        self.config = config
        self.target = target
        self.reason = f"started at {target} replica(s)"
        self._samples: deque[tuple[float, float]] = deque()
        self._last_sample = -math.inf
        self._wish: int | None = None
        self._wish_since = 0.0

    def due(self, now: float) -> bool:
        """Whether a new sample is wanted (every `metrics_interval_s`)."""
        return now - self._last_sample >= self.config.metrics_interval_s

    def observe(self, now: float, queued: int, ongoing: int) -> None:
        self._last_sample = now
        self._samples.append((now, float(queued + ongoing)))
        horizon = now - self.config.look_back_period_s
        while len(self._samples) > 1 and self._samples[0][0] < horizon:
            self._samples.popleft()
        if queued and self.target == 0:  # a request waits at zero replicas: no delay
            self._wish, self._wish_since = None, now
            self._set(max(1, self._desired(queued + ongoing)), now,
                      f"{queued} request(s) waiting at zero replicas")

    def decide(self, now: float) -> int:
        """The number of replicas to run now; `reason` says why it last changed."""
        if not self._samples:
            return self.target
        load = sum(value for _, value in self._samples) / len(self._samples)
        desired = self._desired(load)
        if desired == self.target:
            self._wish = None
            return self.target
        if desired != self._wish:
            self._wish, self._wish_since = desired, now
        delay = (self.config.upscale_delay_s if desired > self.target
                 else self.config.downscale_delay_s)
        if now - self._wish_since >= delay:
            self._set(desired, now, f"average load {load:.1f} over "
                      f"{self.config.look_back_period_s:g}s with target_ongoing_requests "
                      f"{self.config.target_ongoing_requests:g}")
            self._wish = None
        return self.target

    def _desired(self, load: float) -> int:
        config = self.config
        wanted = load / config.target_ongoing_requests
        if wanted > self.target:
            factor = config.upscaling_factor or 1.0
        else:
            factor = config.downscaling_factor or 1.0
        moved = self.target + (wanted - self.target) * factor
        return max(config.min_replicas, min(config.max_replicas, math.ceil(moved - 1e-9)))

    def _set(self, target: int, now: float, why: str) -> None:
        if target == self.target:
            return
        direction = "up" if target > self.target else "down"
        self.reason = f"scaled {direction} from {self.target} to {target}: {why}"
        self.target = target
