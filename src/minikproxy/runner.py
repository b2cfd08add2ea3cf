"""The bounded-frequency runner that drives the proxier's sync loop.

This is minikproxy's counterpart of kube-proxy's ``BoundedFrequencyRunner``
(``pkg/util/async`` in older trees, ``pkg/proxy/runner`` in newer ones). It runs one function
on a background loop and bounds how often it runs from both sides:

- *no more often than* ``min_interval`` (modulo a small burst allowance), so a storm of
  Service/EndpointSlice events turns into a few syncs instead of thousands;
- *no less often than* ``max_interval``, so the rules are periodically rewritten even when
  nothing asks for it;
- *a failed run is retried* within ``retry_interval``, and anyone may ask for a retry with
  ``retry_after()`` (the earliest requested time wins).

Time comes from an injected :class:`Clock`. :class:`RealClock` uses ``time.monotonic``;
:class:`FakeClock` is a manually advanced clock for tests, and the deterministic
``next_deadline()``/``tick()`` API lets tests drive the runner without threads or sleeps.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Protocol

__all__ = ["BoundedFrequencyRunner", "Clock", "FakeClock", "RealClock", "SyncFunc"]

logger = logging.getLogger(__name__)

# The work function. It signals failure by raising, by returning ``False`` or by returning an
# ``Exception`` instance (the Go ``error`` of kube-proxy's runner); anything else is success.
SyncFunc = Callable[[], bool | Exception | None]

# Deadlines closer than this to "now" count as due; guards against float rounding.
_EPSILON = 1e-9


class Clock(Protocol):
    """The time source of a runner (and of the health checks).

    ``now()`` returns seconds as a float. ``wait(cond, timeout)`` blocks on ``cond`` (whose lock
    the caller holds) until it is notified or ``timeout`` seconds have passed on this clock
    (``None`` waits for a notification only).
    """

    def now(self) -> float:
        """Return the current time in seconds."""
        ...

    def wait(self, cond: threading.Condition, timeout: float | None) -> None:
        """Wait on ``cond`` for a notification or for ``timeout`` seconds of this clock."""
        ...


class RealClock:
    """The system clock: ``time.monotonic()`` and a real ``Condition.wait``."""

    def now(self) -> float:
        """Return ``time.monotonic()``."""
        return time.monotonic()

    def wait(self, cond: threading.Condition, timeout: float | None) -> None:
        """Block on ``cond`` for at most ``timeout`` real seconds."""
        cond.wait(timeout)


class FakeClock:
    """A manually driven clock for tests; time only moves through :meth:`advance`.

    ``wait()`` with a timeout does not block: it advances the fake time by ``timeout`` and
    returns, so a :meth:`BoundedFrequencyRunner.loop` on a fake clock jumps straight from one
    deadline to the next. ``wait(cond, None)`` blocks on the condition for real.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def now(self) -> float:
        """Return the fake current time."""
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        """Move the fake time forward by ``seconds`` (must not be negative)."""
        if seconds < 0:
            raise ValueError(f"cannot move a clock backwards ({seconds})")
        with self._lock:
            self._now += seconds

    def set(self, when: float) -> None:
        """Move the fake time forward to ``when``."""
        self.advance(when - self.now())

    def wait(self, cond: threading.Condition, timeout: float | None) -> None:
        """Advance by ``timeout`` without blocking; with ``None``, wait for a notification."""
        if timeout is None:
            cond.wait()
        else:
            self.advance(max(0.0, timeout))


class BoundedFrequencyRunner:
    """Run ``fn`` on demand, at least every ``max_interval`` and at most every ``min_interval``.

    Parameters:

    ``name``
        Used in log messages, e.g. ``"sync-runner"``.
    ``fn``
        The work function (a proxier's ``sync_proxy_rules``). Runs are serialized. It fails by
        raising, returning ``False`` or returning an ``Exception`` instance.
    ``min_interval``
        Seconds that must pass after a run *ends* before the next one starts, modulo bursts
        (kube-proxy's ``--iptables-min-sync-period``, default 1 s). ``0`` means "run as soon
        as requested".
    ``max_interval``
        ``fn`` runs at least once per this many seconds, counted from the end of the last run
        (kube-proxy's ``--iptables-sync-period``, or ``FullSyncPeriod`` = 1 h in newer
        releases). Must be ``>= min_interval``.
    ``burst_runs``
        A token bucket of this size lets up to ``burst_runs`` requested runs go back to back;
        tokens accrue at one per ``min_interval`` while no run is in progress (kube-proxy used
        ``burstSyncs = 2``). With ``1`` there is never a burst.
    ``retry_interval``
        After a failed run, run again no later than this many seconds later (capped at
        ``max_interval``). ``None`` schedules nothing beyond the ``max_interval`` run.
    ``clock``
        The time source; tests pass a :class:`FakeClock`.

    Examples:

    ``BoundedFrequencyRunner("sync", fn, min_interval=1, max_interval=5, burst_runs=1)``
        ``fn`` starts at least 1 s after the previous run ended, and runs at least every 5 s.
    ``BoundedFrequencyRunner("sync", fn, min_interval=3, max_interval=10, burst_runs=3)``
        up to 3 requested runs may go back to back; after that, one per 3 s; at least one
        run every 10 s.
    ``BoundedFrequencyRunner("sync", fn, min_interval=1, max_interval=3600, retry_interval=30)``
        kube-proxy's iptables defaults: a run that fails is retried within 30 s.

    Every run, whatever its trigger, obeys the rate limit. A request made while ``fn`` runs
    is kept and served after it; requests are coalesced, so at most one run is pending.
    Drive the runner either with :meth:`loop` in a thread, or step by step with
    :meth:`next_deadline` and :meth:`tick` (tests).
    """

    def __init__(
        self,
        name: str,
        fn: SyncFunc,
        *,
        min_interval: float,
        max_interval: float,
        burst_runs: int = 2,
        retry_interval: float | None = None,
        clock: Clock | None = None,
    ) -> None:
        if min_interval < 0:
            raise ValueError(f"{name}: min_interval ({min_interval}) must be >= 0")
        if max_interval < min_interval:
            raise ValueError(
                f"{name}: max_interval ({max_interval}) must be >= min_interval ({min_interval})"
            )
        if max_interval <= 0:
            raise ValueError(f"{name}: max_interval ({max_interval}) must be > 0")
        if burst_runs < 1:
            raise ValueError(f"{name}: burst_runs ({burst_runs}) must be >= 1")
        if retry_interval is not None and retry_interval < 0:
            raise ValueError(f"{name}: retry_interval ({retry_interval}) must be >= 0")
        self.name = name
        self._fn = fn
        self.min_interval = float(min_interval)
        self.max_interval = float(max_interval)
        self.burst_runs = burst_runs
        self.retry_interval = None if retry_interval is None else float(retry_interval)
        self._clock: Clock = clock if clock is not None else RealClock()

        self._cond = threading.Condition()  # guards everything below
        self._run_lock = threading.Lock()  # serializes runs of fn
        start = self._clock.now()
        self._pending_since: float | None = None  # when the oldest unserved run() came
        self._retry_at: float | None = None  # earliest requested retry
        self._next_periodic = start + self.max_interval
        self._tokens = float(burst_runs)  # the bucket starts full
        self._tokens_at = start  # when _tokens was last brought up to date

    # -- requests -----------------------------------------------------------------------

    def run(self) -> None:
        """Ask for a run as soon as the rate limit allows. Never blocks; requests coalesce."""
        with self._cond:
            if self._pending_since is None:
                self._pending_since = self._clock.now()
            self._cond.notify_all()

    def retry_after(self, interval: float) -> None:
        """Make sure ``fn`` runs again no later than ``interval`` seconds from now.

        May be called from inside ``fn``; the earliest of several requested times wins.
        """
        with self._cond:
            when = self._clock.now() + max(0.0, interval)
            if self._retry_at is None or when < self._retry_at:
                self._retry_at = when
            self._cond.notify_all()

    # -- deterministic stepping -----------------------------------------------------------

    def next_deadline(self) -> float:
        """Return the clock time at which the next run will start (may be in the past: due)."""
        with self._cond:
            return self._next_deadline_locked()

    def tick(self) -> bool:
        """Run ``fn`` once if it is due at the clock's current time; return whether it ran."""
        with self._run_lock:
            with self._cond:
                if self._next_deadline_locked() > self._clock.now() + _EPSILON:
                    return False
                self._begin_run_locked()
            self._run_and_finish()
            return True

    # -- the loop ---------------------------------------------------------------------------

    def loop(self, stop: threading.Event) -> None:
        """Serve requests, periodic runs and retries until ``stop`` is set.

        Meant to run in its own thread. The ``max_interval`` period starts when the loop does.
        """
        logger.debug("%s: loop running", self.name)
        with self._cond:
            self._next_periodic = self._clock.now() + self.max_interval
        waker = threading.Thread(
            target=self._wake_on_stop, args=(stop,), name=f"{self.name}-stop", daemon=True
        )
        waker.start()
        while not stop.is_set():
            with self._cond:
                wait = self._next_deadline_locked() - self._clock.now()
                if wait > _EPSILON:
                    self._clock.wait(self._cond, wait)
                    continue
            if stop.is_set():
                break
            self.tick()
        logger.debug("%s: loop stopping", self.name)

    def _wake_on_stop(self, stop: threading.Event) -> None:
        stop.wait()
        with self._cond:
            self._cond.notify_all()

    # -- internals --------------------------------------------------------------------------

    def _token_ready_at_locked(self) -> float:
        """When the bucket will hold a whole token (``-inf`` without a rate limit)."""
        if self.min_interval == 0:
            return -math.inf
        missing = max(0.0, 1.0 - self._tokens)
        return self._tokens_at + missing * self.min_interval

    def _next_deadline_locked(self) -> float:
        trigger = self._next_periodic
        if self._retry_at is not None:
            trigger = min(trigger, self._retry_at)
        if self._pending_since is not None:
            trigger = min(trigger, self._pending_since)
        return max(trigger, self._token_ready_at_locked())

    def _begin_run_locked(self) -> None:
        now = self._clock.now()
        if self.min_interval > 0:
            accrued = (now - self._tokens_at) / self.min_interval
            # Clamp at 0: a run may start up to _EPSILON before its token is whole.
            self._tokens = max(0.0, min(float(self.burst_runs), self._tokens + accrued) - 1.0)
            self._tokens_at = now
        # Requests made from now on (also from inside fn) call for another run.
        self._pending_since = None
        self._retry_at = None

    def _run_and_finish(self) -> None:
        failed = False
        try:
            result = self._fn()
        except Exception:
            logger.exception("%s: run failed", self.name)
            failed = True
        else:
            if result is False or isinstance(result, Exception):
                logger.info("%s: run failed: %s", self.name, result)
                failed = True
        with self._cond:
            end = self._clock.now()
            # No tokens accrue while fn runs: min_interval is counted from the end of a run.
            self._tokens_at = end
            self._next_periodic = end + self.max_interval
            if failed and self.retry_interval is not None:
                when = end + min(self.retry_interval, self.max_interval)
                if self._retry_at is None or when < self._retry_at:
                    self._retry_at = when
                logger.debug("%s: scheduling retry at %.3f", self.name, when)
            self._cond.notify_all()
