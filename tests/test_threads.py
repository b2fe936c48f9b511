"""Thread-count policy (students/ops/threads.py): OMP_NUM_THREADS, affinity and cgroup quota, the load
governor's arithmetic and where it ticks, and the CLI's one-line error for a bad OMP_NUM_THREADS."""

from __future__ import annotations

import pytest
import torch

from students.ops import threads as th
from students.ops.csrc import threads as kernel_threads


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    th._governor = None
    torch.set_num_threads(n)


def _cgroup(tmp_path, monkeypatch, v2: str | None = None, v1: tuple[int, int] | None = None, line="0::/job"):
    (tmp_path / "self_cgroup").write_text(line + "\n")
    real_path = th.Path

    def fake_path(p, *rest):  # /proc/self/cgroup -> our file; everything else unchanged
        return real_path(tmp_path / "self_cgroup") if str(p) == "/proc/self/cgroup" else real_path(p, *rest)

    monkeypatch.setattr(th, "Path", fake_path)
    monkeypatch.setattr(th, "CGROUP_ROOT", tmp_path)
    if v2 is not None:
        (tmp_path / "job").mkdir()
        (tmp_path / "job" / "cpu.max").write_text(v2 + "\n")
    if v1 is not None:
        d = tmp_path / "cpu,cpuacct" / "job"
        d.mkdir(parents=True)
        (d / "cpu.cfs_quota_us").write_text(f"{v1[0]}\n")
        (d / "cpu.cfs_period_us").write_text(f"{v1[1]}\n")


def test_available_cores_follows_affinity_and_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(th.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    _cgroup(tmp_path, monkeypatch, v2="150000 100000")  # 1.5 cores -> 2 threads
    assert th.available_cores() == 2


def test_unlimited_and_v1_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(th.os, "sched_getaffinity", lambda pid: {0, 1, 2})
    _cgroup(tmp_path, monkeypatch, v2="max 100000")
    assert th.available_cores() == 3  # no quota: the affinity mask
    other = tmp_path / "v1"
    other.mkdir()
    _cgroup(other, monkeypatch, v1=(100000, 100000), line="4:cpu,cpuacct:/job")
    assert th.available_cores() == 1
    monkeypatch.setattr(th.os, "sched_getaffinity", lambda pid: {7})
    assert th.available_cores() == 1  # taskset to one CPU


def test_default_threads_respects_omp_num_threads(monkeypatch):
    monkeypatch.setattr(th, "available_cores", lambda: 5)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert th.default_threads() == 5
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert th.default_threads() == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("OMP_NUM_THREADS", bad)
        with pytest.raises(ValueError, match="OMP_NUM_THREADS"):
            th.default_threads()


def test_governor_counts_other_processes(monkeypatch):
    """others = (busy ticks / HZ - own CPU seconds) / wall seconds, over the CPUs we may use."""
    clock, busy, own = [100.0], [10_000], [50.0]
    monkeypatch.setattr(th.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(th, "_busy_ticks", lambda cpus: busy[0])
    monkeypatch.setattr(th, "_own_seconds", lambda: own[0])
    gov = th.ThreadGovernor(cores=2, interval=2.0)
    gov.hz = 100
    # 4 s: the 2 CPUs were busy 6 s in all (600 ticks), 2.2 s of it ours -> others 3.8 s / 4 s = 0.95 cores
    clock[0], busy[0], own[0] = 104.0, 10_600, 52.2
    assert gov.others() == pytest.approx(0.95)
    assert [gov.decide(o) for o in (0.0, 0.49, 0.5, 0.95, 1.7, 9.0)] == [2, 2, 1, 1, 1, 1]
    assert th.ThreadGovernor(cores=4).decide(1.2) == 3


def test_tick_sets_torch_threads_only_after_the_interval(monkeypatch):
    clock, busy, own = [0.0], [0], [0.0]
    monkeypatch.setattr(th.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(th, "_busy_ticks", lambda cpus: busy[0])
    monkeypatch.setattr(th, "_own_seconds", lambda: own[0])
    torch.set_num_threads(2)
    th._governor = gov = th.ThreadGovernor(cores=2, interval=2.0)
    gov.hz = 100
    clock[0], busy[0] = 1.0, 200  # one busy core for 1 s, but the interval has not passed
    kernel_threads()
    assert torch.get_num_threads() == 2
    clock[0], busy[0] = 2.5, 500  # 2.5 s, 5 s of CPU by others: 2 cores -> one thread
    assert kernel_threads() == 1 and torch.get_num_threads() == 1
    clock[0], busy[0], own[0] = 5.0, 500 + 250, 2.5  # next 2.5 s: only our own work -> both cores again
    assert kernel_threads() == 2


def test_watch_ticks_before_each_forward(monkeypatch):
    calls = []
    monkeypatch.setattr(th, "tick", lambda: calls.append(1))
    layer = torch.nn.Linear(3, 3)
    th.watch(layer)
    layer(torch.zeros(1, 3))
    layer(torch.zeros(1, 3))
    assert len(calls) == 2


def test_configure_threads(monkeypatch):
    monkeypatch.setattr(th, "available_cores", lambda: 2)
    monkeypatch.setattr(th.os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(th.os, "sched_getaffinity", lambda pid: set(range(th.os.cpu_count())))
    assert th.configure_threads() == 2 and th.governor() is not None
    monkeypatch.setattr(th.os, "getloadavg", lambda: (1.3, 0.0, 0.0))  # one core busy elsewhere: start at 1
    assert th.configure_threads() == 1 and torch.get_num_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's choice: kept, no governor
    assert th.configure_threads() == 2 and th.governor() is None


def test_cli_bad_omp_num_threads_is_one_line_exit_2(monkeypatch, capsys):
    from pipeline.cli import main

    monkeypatch.setenv("OMP_NUM_THREADS", "lots")
    assert main(["leaderboard", "/nonexistent"]) == 2
    err = capsys.readouterr().err.strip()
    assert "OMP_NUM_THREADS" in err and "\n" not in err
