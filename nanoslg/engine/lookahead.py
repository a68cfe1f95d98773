"""When the overlap loop plans the step after the one on the device (`scheduler.hold_lookahead`).

With overlap, step N+1 is planned and launched as soon as step N starts on the device, so the device
never waits for the host. A request that arrives while N runs then misses N+1 as well: its prompt
waits for the rest of N and all of N+1. When N is a decode step and nothing is waiting, N+1 can be
planned later without idling the device: just before N is due to end, which is N's start plus the
device time of the last decode step of as many rows, less what the host takes to plan and launch a
step and a slack. A request that arrives before then wakes the loop and joins N+1.

The estimate leans early: N's start is taken as the moment the step before it was collected (it may
have started later, if its launch was late), the device time is that of a step of at most as many
rows, and the host's share is its recent maximum (from planning to launched, less any wait behind an
eager step's launch, which a held step never has). A step with a prompt chunk, a speculative step,
or one without a measured device time is never held.
"""

from __future__ import annotations

import asyncio
import bisect
import time

from nanoslg.core.plan import StepPlan, StepResult

SLACK_S = 0.001  # beyond the host's own planning and launch time: its jitter and the event loop's millisecond timers
LEAD_DECAY = 0.9  # the host's share decays this much a step, and jumps up at once


class LookaheadHold:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._rows: list[int] = []  # decode step row counts with a measured device time, sorted
        self._device_s: dict[int, float] = {}  # row count -> the last such step's device time
        self._lead_s = 0.0  # the host's time to plan and launch a decode step, its recent maximum
        self._collected_at: float | None = None  # when the last step came back
        # For the log: holds, the seconds held, holds a request ended, the lead summed, deadlines already past.
        self.holds, self.held_s, self.woken, self._lead_sum, self.late = 0, 0.0, 0, 0.0, 0

    def collected(self, plan: StepPlan, result: StepResult) -> None:
        """A step came back: the step queued behind it starts on the device about now."""
        self._collected_at = time.perf_counter()
        if result.device_s is not None and plan.is_sampled_decode and not plan.spec:
            n = len(plan.seqs)
            if n not in self._device_s:
                bisect.insort(self._rows, n)
            self._device_s[n] = result.device_s

    def host_time(self, plan: StepPlan, seconds: float) -> None:
        """Planning plus launching `plan` took `seconds` of the host."""
        if plan.is_sampled_decode:
            self._lead_s = max(seconds, self._lead_s * LEAD_DECAY)

    def deadline(self, running: StepPlan, waiting: int) -> float | None:
        """perf_counter time until which planning the step after `running` may wait, or None."""
        if not self.enabled or waiting or self._collected_at is None:
            return None
        if not running.is_sampled_decode or running.spec or running.sample_later:
            return None
        i = bisect.bisect_right(self._rows, len(running.seqs))
        if i == 0:  # no decode step of at most as many rows measured yet
            return None
        device_s = self._device_s[self._rows[i - 1]]
        return self._collected_at + device_s - self._lead_s - SLACK_S

    async def wait(self, running: StepPlan, waiting: int, wake: asyncio.Event) -> None:
        """Waits, up to the deadline for the step after `running`, for `wake` (a request arrived)."""
        if not self.enabled:
            return
        wake.clear()  # a request added from here on sets it again
        until = self.deadline(running, waiting)
        if until is None:
            return
        start = time.perf_counter()
        if until <= start:
            self.late += 1
            return
        try:
            await asyncio.wait_for(wake.wait(), until - start)
            self.woken += 1
        except TimeoutError:
            pass
        self.holds += 1
        self.held_s += time.perf_counter() - start
        self._lead_sum += self._lead_s

    def summary(self) -> str | None:
        if not self.holds and not self.late:
            return None
        n = max(self.holds, 1)
        return (
            f"held {self.holds} steps after a decode step, {1e3 * self.held_s / n:.2f} ms on average ({self.woken} "
            f"ended early by a request; {self.late} not held, their deadline past); host lead "
            f"{1e3 * self._lead_sum / n:.2f} ms, slack {1e3 * SLACK_S:.1f} ms"
        )
