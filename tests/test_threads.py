"""The stage runner's thread environment: a fixed thread count, the wait policy from the free cores."""

from __future__ import annotations

import os

import pytest

from replication import stage
from replication.stage import cpu_times, free_cores, thread_environment

STAT_BEFORE = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 50 0 25 400 25 0 0 0 0 0\nintr 1 2 3\n"
#: 1000 more jiffies, 250 of them idle or iowait: a quarter of the machine free
STAT_AFTER = "cpu  700 0 100 1000 100 0 0 0 0 0\ncpu0 50 0 25 400 25 0 0 0 0 0\nintr 1 2 3\n"


def test_cpu_times_reads_the_aggregate_line_idle_plus_iowait():
    assert cpu_times(STAT_BEFORE) == (800 + 50, 100 + 50 + 800 + 50)
    with pytest.raises(ValueError, match="cpu"):
        cpu_times("cpu0 1 2 3 4\n")


def test_free_cores_is_the_idle_fraction_of_all_cores(tmp_path, monkeypatch):
    path = tmp_path / "stat"
    path.write_text(STAT_BEFORE)
    monkeypatch.setattr(stage.time, "sleep", lambda s: path.write_text(STAT_AFTER))
    monkeypatch.setattr(stage.os, "cpu_count", lambda: 4)
    # idle went 850 -> 1100 (+250) of total 1000 -> 1900 (+900)
    assert free_cores(0.0, str(path)) == pytest.approx(4 * 250 / 900)
    assert free_cores(0.0, str(tmp_path / "missing")) is None


@pytest.mark.parametrize(("threads", "free", "passive"), [
    (2, 0.9, True),    # one of two cores taken by something else: sleep while waiting
    (2, 1.4, True),
    (2, 1.6, False),   # (almost) free: spinning is faster
    (2, None, False),  # unknown: leave OpenMP's default
    (1, 0.1, False),   # one thread never waits for a partner
])
def test_wait_policy_follows_the_free_cores_thread_count_does_not(threads, free, passive):
    env = thread_environment(threads, {}, free)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == str(threads)
    assert ("OMP_WAIT_POLICY" in env) == passive
    if passive:
        assert env["OMP_WAIT_POLICY"] == "PASSIVE"


def test_the_users_own_settings_win():
    user = {"OMP_NUM_THREADS": "4", "OMP_WAIT_POLICY": "ACTIVE"}
    assert thread_environment(2, user, 0.2) == {"MKL_NUM_THREADS": "2"}
    assert "OMP_WAIT_POLICY" not in thread_environment(2, {"GOMP_SPINCOUNT": "1000"}, 0.2)


def test_set_thread_environment_writes_what_it_decided(monkeypatch):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(stage, "free_cores", lambda: 0.5)
    added = stage.set_thread_environment(2)
    assert added["OMP_WAIT_POLICY"] == os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert os.environ["OMP_NUM_THREADS"] == "2"
