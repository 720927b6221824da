"""Statistics over seeds for scripts/keyroom_table.py, with numpy only.

- `iqm`: the interquartile mean, the mean of the middle half of the values (sorted,
  a quarter trimmed from each end, fractional weights at the cut points, as in
  Agarwal et al. 2021 "Deep RL at the edge of the statistical precipice").
- `bootstrap_ci`: a percentile bootstrap interval of a statistic over seeds: the
  seeds are resampled with replacement, the statistic taken on each resample, and
  the interval read off the resampled statistics' quantiles.
- `steps_to`, `final_success`, `min_success_after`: what one run's metrics.jsonl
  says.

Run `python3 scripts/seed_stats.py` to check the functions against hand-worked cases.
"""
import numpy as np


def iqm(values):
    """Mean of the middle 50% of `values`, trimming 25% from each end."""
    x = np.sort(np.asarray(values, dtype=float))
    n = len(x)
    if n == 0:
        raise ValueError("iqm of no values")
    # Each value covers [i/n, (i+1)/n) of the distribution; weight its overlap with
    # the middle half [0.25, 0.75).
    lo, hi = np.arange(n) / n, np.arange(1, n + 1) / n
    w = np.clip(np.minimum(hi, 0.75) - np.maximum(lo, 0.25), 0.0, None)
    return float(np.dot(w, x) / w.sum())


def bootstrap_ci(values, stat=iqm, level=0.95, resamples=10_000, seed=0):
    """Percentile bootstrap interval (lo, hi) of `stat` over `values`."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(resamples, len(x)))
    stats = np.array([stat(x[i]) for i in idx])
    tail = (1.0 - level) / 2.0
    return (float(np.quantile(stats, tail)), float(np.quantile(stats, 1.0 - tail)))


def final_success(rows):
    """Success rate over the last 100 episodes when the run stopped."""
    return rows[-1]["success_rate"]


def steps_to(rows, rate, min_episodes=100):
    """Env steps of the first update whose success window (full: at least
    `min_episodes` episodes) reached `rate`, or None if none did."""
    for r in rows:
        if r["episodes"] >= min_episodes and r["success_rate"] >= rate:
            return r["env_steps"]
    return None


def min_success_after(rows, last_steps):
    """The lowest success rate over the run's last `last_steps` env steps."""
    end = rows[-1]["env_steps"]
    return min(r["success_rate"] for r in rows if r["env_steps"] >= end - last_steps)


def _check():
    assert iqm([1, 2, 3, 4]) == 2.5
    # 8 values: the middle four exactly.
    assert iqm([0, 0, 1, 2, 3, 4, 100, 100]) == 2.5
    # 10 values: 2.5 values trimmed per end, the cut values weigh one half.
    assert abs(iqm(range(10)) - 4.5) < 1e-12
    assert abs(iqm([0, 0, 0, 1, 1, 1, 1, 1, 1, 1]) - (0.5 * 0 + 4 * 1 + 0.5 * 1) / 5) < 1e-12
    lo, hi = bootstrap_ci([0.9] * 10)
    assert lo == hi == 0.9
    lo, hi = bootstrap_ci([0.0, 1.0] * 5)
    assert 0.0 <= lo < 0.5 < hi <= 1.0
    rows = [
        {"env_steps": 100, "episodes": 50, "success_rate": 0.9},
        {"env_steps": 200, "episodes": 120, "success_rate": 0.7},
        {"env_steps": 300, "episodes": 200, "success_rate": 0.85},
        {"env_steps": 400, "episodes": 300, "success_rate": 0.6},
    ]
    assert steps_to(rows, 0.8) == 300, "a window under 100 episodes does not count"
    assert steps_to(rows, 0.95) is None
    assert min_success_after(rows, 150) == 0.6
    assert min_success_after(rows, 250) == 0.6
    assert final_success(rows) == 0.6
    print("seed_stats: all checks pass")


if __name__ == "__main__":
    _check()
