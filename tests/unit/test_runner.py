"""BoundedFrequencyRunner: exact timings on a fake clock, no sleeps."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from minikproxy.runner import BoundedFrequencyRunner, FakeClock

Fn = Callable[[], "bool | Exception | None"]


class Raise:
    """An outcome of a recorded run: raise ``error`` instead of returning."""

    def __init__(self, error: Exception) -> None:
        self.error = error


Outcome = bool | Exception | Raise | None


class Recorder:
    """A work function that records the fake time of each run and can fail on demand."""

    def __init__(self, clock: FakeClock, duration: float = 0.0) -> None:
        self.clock = clock
        self.duration = duration
        self.times: list[float] = []
        self.results: list[Outcome] = []
        self.during: Callable[[], None] | None = None

    def __call__(self) -> bool | Exception | None:
        self.times.append(self.clock.now())
        if self.during is not None:
            self.during()
        self.clock.advance(self.duration)
        result = self.results.pop(0) if self.results else None
        if isinstance(result, Raise):
            raise result.error
        return result


def make(
    clock: FakeClock,
    fn: Fn,
    *,
    min_interval: float = 1.0,
    max_interval: float = 100.0,
    burst_runs: int = 1,
    retry_interval: float | None = None,
) -> BoundedFrequencyRunner:
    return BoundedFrequencyRunner(
        "test",
        fn,
        min_interval=min_interval,
        max_interval=max_interval,
        burst_runs=burst_runs,
        retry_interval=retry_interval,
        clock=clock,
    )


def drive(runner: BoundedFrequencyRunner, clock: FakeClock, until: float) -> None:
    """Jump the clock from deadline to deadline, running as the loop would, up to ``until``."""
    while True:
        deadline = runner.next_deadline()
        if deadline > until:
            clock.set(max(clock.now(), until))
            return
        clock.set(max(clock.now(), deadline))
        assert runner.tick()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)


def test_run_is_served_at_once_then_min_interval_applies(clock: FakeClock) -> None:
    rec = Recorder(clock)
    runner = make(clock, rec)
    start = clock.now()
    assert runner.next_deadline() == start + 100  # only the periodic run is scheduled
    assert not runner.tick()

    runner.run()
    assert runner.next_deadline() == start
    assert runner.tick()
    clock.advance(0.25)
    runner.run()
    assert runner.next_deadline() == start + 1.0
    clock.advance(0.5)
    assert not runner.tick()  # too early: 0.75 s after the last run
    clock.set(start + 1.0)
    assert runner.tick()
    assert rec.times == [start, start + 1.0]


def test_requests_coalesce_into_one_run(clock: FakeClock) -> None:
    rec = Recorder(clock)
    runner = make(clock, rec)
    start = clock.now()
    runner.run()
    runner.tick()
    for _ in range(5):
        clock.advance(0.1)
        runner.run()
    drive(runner, clock, start + 50)
    assert rec.times == [start, start + 1.0]
    assert runner.next_deadline() == start + 1.0 + 100


def test_min_interval_counts_from_the_end_of_a_run(clock: FakeClock) -> None:
    rec = Recorder(clock, duration=0.5)
    runner = make(clock, rec, min_interval=2.0)
    start = clock.now()
    runner.run()
    runner.tick()
    runner.run()
    assert runner.next_deadline() == start + 0.5 + 2.0


def test_burst_runs_go_back_to_back_then_one_per_min_interval(clock: FakeClock) -> None:
    rec = Recorder(clock)
    runner = make(clock, rec, min_interval=1.0, burst_runs=2)
    start = clock.now()
    for _ in range(4):
        runner.run()
        clock.set(max(clock.now(), runner.next_deadline()))
        assert runner.tick()
    assert rec.times == [start, start, start + 1.0, start + 2.0]

    # Idle for a while: the bucket refills to 2 tokens, not more.
    clock.advance(10)
    t = clock.now()
    for _ in range(3):
        runner.run()
        clock.set(max(clock.now(), runner.next_deadline()))
        assert runner.tick()
    assert rec.times[4:] == [t, t, t + 1.0]


def test_function_runs_at_least_every_max_interval(clock: FakeClock) -> None:
    rec = Recorder(clock)
    runner = make(clock, rec, max_interval=10.0)
    start = clock.now()
    drive(runner, clock, start + 35)
    assert rec.times == [start + 10, start + 20, start + 30]

    # A requested run restarts the period.
    assert clock.now() == start + 35
    runner.run()
    drive(runner, clock, start + 50)
    assert rec.times[3:] == [start + 35, start + 45]


def test_retry_after_keeps_the_earliest_time(clock: FakeClock) -> None:
    rec = Recorder(clock)
    runner = make(clock, rec)
    start = clock.now()
    runner.retry_after(5)
    runner.retry_after(8)  # later: ignored
    assert runner.next_deadline() == start + 5
    clock.advance(1)
    runner.retry_after(2)  # earlier: wins
    assert runner.next_deadline() == start + 3
    drive(runner, clock, start + 50)
    assert rec.times == [start + 3]
    assert runner.next_deadline() == start + 3 + 100  # the retry was consumed


def test_retry_after_is_rate_limited(clock: FakeClock) -> None:
    rec = Recorder(clock)
    runner = make(clock, rec, min_interval=4.0)
    start = clock.now()
    runner.run()
    runner.tick()
    runner.retry_after(1)
    assert runner.next_deadline() == start + 4


def test_retry_after_called_from_inside_the_run_survives_it(clock: FakeClock) -> None:
    rec = Recorder(clock)
    runner = make(clock, rec)
    start = clock.now()
    rec.during = lambda: runner.retry_after(7)
    runner.run()
    runner.tick()
    rec.during = None
    assert runner.next_deadline() == start + 7


def test_run_requested_during_a_run_is_served_after_it(clock: FakeClock) -> None:
    rec = Recorder(clock, duration=0.5)
    runner = make(clock, rec)
    start = clock.now()
    rec.during = runner.run
    runner.run()
    runner.tick()
    rec.during = None
    drive(runner, clock, start + 10)
    assert rec.times == [start, start + 1.5]


@pytest.mark.parametrize(
    "failure",
    [Raise(RuntimeError("boom")), False, RuntimeError("returned, not raised")],
    ids=["raises", "returns-false", "returns-exception"],
)
def test_failed_run_is_retried_after_retry_interval(clock: FakeClock, failure: Outcome) -> None:
    rec = Recorder(clock)
    rec.results = [failure, None]
    runner = make(clock, rec, max_interval=60.0, retry_interval=5.0)
    start = clock.now()
    runner.run()
    drive(runner, clock, start + 100)
    assert rec.times == [start, start + 5, start + 65]


def test_success_aborts_the_retry(clock: FakeClock) -> None:
    rec = Recorder(clock)
    rec.results = [False, None]
    runner = make(clock, rec, max_interval=60.0, retry_interval=5.0)
    start = clock.now()
    runner.run()
    runner.tick()
    clock.advance(2)
    runner.run()  # succeeds at +2
    drive(runner, clock, start + 30)
    assert rec.times == [start, start + 2]


def test_retry_interval_is_capped_by_max_interval_and_optional(clock: FakeClock) -> None:
    rec = Recorder(clock)
    rec.results = [False]
    runner = make(clock, rec, max_interval=10.0, retry_interval=30.0)
    runner.run()
    runner.tick()
    assert runner.next_deadline() == clock.now() + 10

    rec2 = Recorder(clock)
    rec2.results = [False]
    no_retry = make(clock, rec2, max_interval=10.0)
    no_retry.run()
    no_retry.tick()
    assert no_retry.next_deadline() == clock.now() + 10


def test_a_failing_run_does_not_break_the_runner(clock: FakeClock) -> None:
    rec = Recorder(clock)
    rec.results = [Raise(RuntimeError("first")), Raise(ValueError("second"))]
    runner = make(clock, rec, retry_interval=3.0)
    start = clock.now()
    runner.run()
    drive(runner, clock, start + 10)
    assert rec.times == [start, start + 3, start + 6]


def test_zero_min_interval_runs_every_request_at_once(clock: FakeClock) -> None:
    rec = Recorder(clock)
    runner = make(clock, rec, min_interval=0.0, max_interval=10.0)
    for _ in range(3):
        runner.run()
        assert runner.next_deadline() == clock.now()
        assert runner.tick()
    assert rec.times == [clock.now()] * 3
    assert not runner.tick()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_interval": 5.0, "max_interval": 1.0}, "max_interval"),
        ({"min_interval": -1.0, "max_interval": 1.0}, "min_interval"),
        ({"min_interval": 1.0, "max_interval": 1.0, "burst_runs": 0}, "burst_runs"),
        ({"min_interval": 1.0, "max_interval": 1.0, "retry_interval": -1.0}, "retry_interval"),
    ],
)
def test_invalid_parameters_are_rejected(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BoundedFrequencyRunner("bad", lambda: None, **kwargs)  # type: ignore[arg-type]


def test_loop_on_fake_clock_runs_periodically_until_stopped(clock: FakeClock) -> None:
    stop = threading.Event()
    times: list[float] = []

    def fn() -> None:
        times.append(clock.now())
        if len(times) == 3:
            stop.set()

    runner = make(clock, fn, max_interval=10.0)
    start = clock.now()
    runner.loop(stop)  # returns once fn sets stop
    assert times == [start + 10, start + 20, start + 30]


def test_loop_serves_requests_and_stops_promptly() -> None:
    ran = threading.Event()
    runner = BoundedFrequencyRunner(
        "real", ran.set, min_interval=0.0, max_interval=3600.0, burst_runs=1
    )
    stop = threading.Event()
    thread = threading.Thread(target=runner.loop, args=(stop,), daemon=True)
    thread.start()
    runner.run()
    assert ran.wait(5), "a requested run was not served"
    stop.set()
    thread.join(5)
    assert not thread.is_alive(), "loop did not stop"
