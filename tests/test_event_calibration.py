"""The per-CPU crossover calibration of the event path (students/ops/event_linear/calibrate.py), driven by an
injected timer or cost model: the table it derives (expected values worked out by hand from the model), its
robustness to outliers, monotony and work cap, the cache (per CPU, library, torch version and thread count), the
fallback, and `event_plan` reading the table. No timing asserts."""
from __future__ import annotations

import json

import pytest
import torch

from students.ops.csrc import library
from students.ops.event_linear import calibrate, event_plan

pytestmark = pytest.mark.skipif(library() is None, reason="the CPU kernel library could not be built (no g++?)")


def cost_model(slope: float, outlier_every: int = 0):
    """time_pair whose event/dense ratio is rate * (1 + rows / slope); every `outlier_every`-th pair has its
    event (odd pairs) or dense (even pairs) call 100x slower, as a busy machine would."""
    count = [0]

    def time_pair(rows, rate):
        count[0] += 1
        dense, event = 1e-3 * rows, 1e-3 * rows * rate * (1 + rows / slope)
        if outlier_every and count[0] % outlier_every == 0:
            if count[0] // outlier_every % 2:
                event *= 100
            else:
                dense *= 100
        return dense, event

    return time_pair


# ratio = rate (1 + rows / 10), won below WIN = 0.9: 1 row -> rate < 0.82 (0.7 of RATES), 4 rows -> < 0.64
# (0.5), 16 rows -> < 0.35 (0.3), 64 rows -> < 0.12 (0.1), 256 rows -> < 0.034 (none: the table ends).
HAND_TABLE = ((1, 0.7), (4, 0.5), (16, 0.3), (64, 0.1))


def test_crossover_from_a_cost_model():
    assert calibrate.measure_crossover(cost_model(10), n_weights=1) == HAND_TABLE


def test_outliers_do_not_move_it():
    """One pair in five with a 100x slower call, on either side: the median of five pairs ignores it (a mean
    would not)."""
    assert calibrate.measure_crossover(cost_model(10, outlier_every=5), n_weights=1) == HAND_TABLE


def test_more_rows_never_get_a_higher_rate():
    def dips_at_four(rows, rate):  # ratio rate * 1.2 at every row count but 4, where it is rate * 0.5
        return 1.0, rate * (0.5 if rows == 4 else 1.2)

    # 1 row: rate < 0.75 -> 0.7; 4 rows would reach 0.9 but are capped at 0.7; 16 and more rows 0.7 too
    table = calibrate.measure_crossover(dips_at_four, n_weights=1)
    assert table == ((1, 0.7), (4, 0.7), (16, 0.7), (64, 0.7), (256, 0.7))


def test_work_cap_ends_the_table():
    # 2^20 weights: 64 rows = 2^26 multiply-adds is measured, 256 rows is not
    assert calibrate.measure_crossover(lambda r, x: (1.0, 0.1), n_weights=1 << 20) == (
        (1, 0.9), (4, 0.9), (16, 0.9), (64, 0.9))


@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf"), -1.0])
def test_unusable_timings_raise(bad):
    with pytest.raises(calibrate.CalibrationError):
        calibrate.measure_crossover(lambda r, x: (1.0, bad), n_weights=1)


def test_pair_timer_puts_each_time_in_its_slot(monkeypatch):
    """An injected clock that the dense call advances by 3 and the event call by 1: (3, 1) whichever ran first."""
    from students.ops.event_linear import cpu, reference

    clock = [0.0]

    def advance(by):
        def call(*args, **kwargs):
            clock[0] += by

        return call

    monkeypatch.setattr(reference, "event_linear_reference", advance(3.0))
    monkeypatch.setattr(cpu, "event_linear_cpu", advance(1.0))
    time_pair = calibrate.pair_timer(16, 8, timer=lambda: clock[0])
    assert [time_pair(2, 0.5) for _ in range(4)] == [(3.0, 1.0)] * 4


def test_calibrate_measures_real_kernels_into_a_valid_table():
    tables = calibrate.calibrate(1)
    assert set(tables) == {"small", "large"}
    for table in tables.values():
        rows = [r for r, _ in table]
        rates = [x for _, x in table]
        assert rows == list(calibrate.ROWS[: len(rows)]) and set(rates) <= set(calibrate.RATES)
        assert rates == sorted(rates, reverse=True)


def test_cache_per_thread_count_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("SPIKEDISTILL_CACHE", str(tmp_path))
    calls = []

    def measure(threads):
        calls.append(threads)
        return {"small": ((1, 0.3),), "large": ((4, 0.5), (16, 0.2))}

    first = calibrate.load_or_measure(1, measure)
    assert first == {"small": ((1, 0.3),), "large": ((4, 0.5), (16, 0.2))}
    assert calibrate.load_or_measure(1, measure) == first and calls == [1]  # read back, not measured again
    calibrate.load_or_measure(2, measure)
    assert calls == [1, 2]
    data = json.loads(calibrate.cache_file().read_text())
    assert set(data["threads"]) == {"1", "2"} and data["cpu"].startswith(calibrate.cpu_signature()[:10])
    calibrate.cache_file().write_text("{not json")  # corrupt: measured again
    calibrate.load_or_measure(1, measure)
    assert calls == [1, 2, 1]
    monkeypatch.setattr(calibrate, "cpu_signature", lambda: "another CPU\nflags: avx2")
    calibrate.load_or_measure(1, measure)  # another CPU: another file
    assert calls == [1, 2, 1, 1] and len(list((tmp_path / "event_crossover").glob("*.json"))) == 2


class Probe:
    """Stands in for threads.ThreadGovernor: other processes used `busy` cores' worth of our CPUs meanwhile."""

    def __init__(self, busy):
        self.busy = busy

    def __call__(self, threads):
        return self

    def others(self):
        return self.busy


def test_a_contended_multi_thread_measurement_is_used_but_not_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("SPIKEDISTILL_CACHE", str(tmp_path))
    calls = []

    def measure(threads):
        calls.append(threads)
        return {"small": (), "large": ((1, 0.3),)}

    busy, quiet = Probe(1.2), Probe(0.1)
    assert calibrate.load_or_measure(2, measure, probe=busy) == {"small": (), "large": ((1, 0.3),)}
    assert not calibrate.cache_file().exists()
    calibrate.load_or_measure(1, measure, probe=busy)  # one thread: CPU time, the load does not matter
    calibrate.load_or_measure(2, measure, probe=quiet)
    calibrate.load_or_measure(2, measure, probe=busy)
    assert calls == [2, 1, 2]  # the quiet two-thread measurement was kept
    assert set(json.loads(calibrate.cache_file().read_text())["threads"]) == {"1", "2"}


def test_unusable_timings_fall_back_and_are_not_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("SPIKEDISTILL_CACHE", str(tmp_path))

    def broken(threads):
        return {size: calibrate.measure_crossover(lambda r, x: (0.0, 0.0), 1) for size in calibrate.SIZES}

    assert calibrate.load_or_measure(1, broken) == calibrate.FALLBACK
    assert not calibrate.cache_file().exists()


def test_event_plan_reads_the_table(monkeypatch):
    monkeypatch.delenv("SPIKEDISTILL_SPARSE", raising=False)
    tables = {"small": ((1, 0.3),), "large": ((4, 0.9), (16, 0.5), (64, 0.2))}
    monkeypatch.setattr(calibrate, "_tables", {torch.get_num_threads(): tables})
    head, ffn = torch.randn(8192, 128), torch.randn(512, 256)  # 2^20 weights (large), 2^17 (small)
    with torch.no_grad():
        assert event_plan(torch.zeros(1, 1, 128), head) == 0.9
        assert event_plan(torch.zeros(1, 10, 128), head) == 0.5  # up to 16 rows
        assert event_plan(torch.zeros(2, 32, 128), head) == 0.2
        assert event_plan(torch.zeros(4, 512, 128), head) is None  # beyond the table: dense
        assert event_plan(torch.zeros(1, 1, 256), ffn) == 0.3
        assert event_plan(torch.zeros(1, 2, 256), ffn) is None
        assert event_plan(torch.zeros(1, 1, 128), torch.randn(128, 128)) is None  # below MIN_WEIGHTS
    assert event_plan(torch.zeros(1, 1, 128), head.requires_grad_()) is None  # grad mode on, weight trainable
