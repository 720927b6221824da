#!/usr/bin/env python3
"""Several seeds of each variant of a table, one `spur local` run per seed in a run
directory of its own, then markdown tables: each seed's figures and, per variant,
the interquartile mean (IQM) over seeds with a 95% percentile bootstrap interval.

Tables (every one is the same loop over its variants' configs and the seeds):
  make-run            `make run` itself: configs/keyroom-oni.toml as it is
  rewards             keyroom: extrinsic only vs ONI retrieval, classification, ranking
  advantages          keyroom: vtrace, gae, uis1, hybrid (ONI retrieval rewards,
                      groups of 4 episodes), and uis1 and hybrid with UI-S1's
                      z-scores instead of the keyroom config's mean-only terms,
                      with and without its spread threshold
  minihack            MiniHack-Room-5x5 through the env bridge, feedforward and LSTM
  nethack-score | nethack-staircase | nethack-oracle
                      NetHack through the env bridge: extrinsic only vs ONI
                      retrieval, classification, ranking
  minihack-keyroom | minihack-river | minihack-maze
                      MiniHack's sparse-reward tasks, the same four variants

Per run: final success and return (the last 100 episodes when the run stops), the
lowest success over the last fifth of the budget (200k steps of 1M: does the curve
stay up?), and the env steps
at which the 100-episode success first reached the threshold (80%). Runs that never
reach it are counted at the full budget, a lower bound on their true figure, so
the steps-to-threshold IQM of a variant with such runs is optimistic; the table
says how many runs reached it.

Run directories that already hold a finished run (metrics up to the budget) are
read, not run again, so a table can be resumed with the same --out.

Usage: scripts/keyroom_table.py [--table rewards] [--seeds 5] [--first-seed 1]
           [--steps N] [--parallel 1] [--out runs/table-rewards]
           [--spur target/release/spur]
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import seed_stats as st  # noqa: E402

ONI = "configs/keyroom-oni.toml"
GROUPED = ["--set", "actor.group_size=4"]


def oni_variants(config):
    """Extrinsic reward only, then each ONI reward model, all with the rule judge."""
    return [
        ("extrinsic only", config, ["--set", "intrinsic.enabled=false"]),
        ("ONI retrieval (rule judge)", config, []),
        ("ONI classification (rule judge)", config, ["--set", "intrinsic.model=classification"]),
        ("ONI ranking (rule judge)", config, ["--set", "intrinsic.model=ranking"]),
    ]


# name -> (title, [(variant, config, extra spur arguments)])
TABLES = {
    "make-run": ("`make run` (keyroom 15x15 with ONI retrieval rewards, rule judge)",
                 [("make run", ONI, [])]),
    "rewards": ("keyroom 15x15, 200-step limit: extrinsic reward only vs ONI", [
        ("extrinsic only", "configs/keyroom.toml", []),
        ("ONI retrieval (rule judge)", ONI, []),
        ("ONI classification (rule judge)", ONI, ["--set", "intrinsic.model=classification"]),
        ("ONI ranking (rule judge)", ONI, ["--set", "intrinsic.model=ranking"]),
    ]),
    "advantages": ("keyroom 15x15 with ONI retrieval rewards, groups of 4 episodes", [
        (f"{name}", ONI, GROUPED + ["--set", f"learner.advantage={name}"])
        for name in ["vtrace", "gae", "uis1", "hybrid"]
    ] + [
        # UI-S1's own normalization (mean_std_norm) and no spread threshold beyond 0
        (f"{name}, z-scores", ONI, GROUPED + [
            "--set", f"learner.advantage={name}", "--set", "learner.group_std_norm=true",
            "--set", "learner.group_min_spread=0"])
        for name in ["uis1", "hybrid"]
    ] + [
        # z-scores with the keyroom config's spread threshold: which of the two matters
        ("uis1, z-scores, spread > 0.05", ONI, GROUPED + [
            "--set", "learner.advantage=uis1", "--set", "learner.group_std_norm=true"]),
    ]),
    "minihack": ("MiniHack-Room-5x5 through the env bridge", [
        ("feedforward", "configs/minihack-room.toml", []),
        ("LSTM", "configs/minihack-room-lstm.toml", []),
    ]),
    **{
        f"nethack-{task}": (f"NetHack ({task}) through the env bridge",
                            oni_variants(f"configs/nethack-{task}.toml"))
        for task in ["score", "staircase", "oracle"]
    },
    **{
        f"minihack-{task}": (f"MiniHack {title} through the env bridge",
                             oni_variants(f"configs/minihack-{task}-oni.toml"))
        for task, title in [("keyroom", "KeyRoom-S5"), ("river", "River-Narrow"),
                            ("maze", "MazeWalk-15x15")]
    },
}

# 'Does the curve stay up?' looks at the last fifth of each run's budget.
STAY_UP_FRACTION = 0.2


def read_rows(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a run killed mid-write leaves a partial last line
    return rows


def spur_command(args, config, extra, seed, run_dir):
    cmd = [args.spur, "local", "--config", config, "--run-dir", run_dir,
           "--set", f"run.seed={seed}",
           "--set", f"reward_service.store={os.path.join(run_dir, 'labels.redb')}"]
    if args.steps:
        cmd += ["--set", f"stop.env_steps={args.steps}"]
    return cmd + extra


def budget(args, config, extra):
    """The env-step budget of a variant: --steps, else the config's (or its override)."""
    if args.steps:
        return args.steps
    for i, a in enumerate(extra):
        if a.startswith("stop.env_steps=") and extra[i - 1] == "--set":
            return int(a.split("=", 1)[1])
    import tomllib
    with open(config, "rb") as f:
        return tomllib.load(f)["stop"]["env_steps"]


def run_one(args, job):
    name, config, extra, seed, run_dir, steps = job
    rows = read_rows(run_dir)
    if rows and rows[-1]["env_steps"] >= steps:
        print(f"{name}, seed {seed}: finished run found in {run_dir}", file=sys.stderr, flush=True)
    else:
        if os.path.exists(run_dir):
            raise SystemExit(f"{run_dir} holds an unfinished run: remove it or choose another --out")
        print(f"running {name}, seed {seed} ...", file=sys.stderr, flush=True)
        os.makedirs(os.path.dirname(run_dir) or ".", exist_ok=True)
        with open(run_dir + ".log", "w") as log:
            subprocess.run(spur_command(args, config, extra, seed, run_dir),
                           check=True, stdout=log, stderr=subprocess.STDOUT)
        rows = read_rows(run_dir)
    judge = {}
    jpath = os.path.join(run_dir, "reward_service.json")
    if os.path.exists(jpath):
        with open(jpath) as f:
            judge = json.load(f)
    return rows, judge


def summarise(rows, steps, threshold):
    hit = st.steps_to(rows, threshold)
    return {
        "final": st.final_success(rows),
        "stay_up": st.min_success_after(rows, int(steps * STAY_UP_FRACTION)),
        "hit": hit,
        "hit_or_budget": hit if hit is not None else steps,
        "episodes": rows[-1]["episodes"],
        "return": rows[-1]["episode_return_mean"],
    }


def fmt_ci(values, scale=1.0, digits=2):
    m = st.iqm(values) / scale
    lo, hi = st.bootstrap_ci(values)
    return f"{m:.{digits}f} [{lo / scale:.{digits}f}, {hi / scale:.{digits}f}]"


def print_tables(args, title, results, threshold, steps):
    pct = int(round(threshold * 100))
    last = f"last {int(steps * STAY_UP_FRACTION) // 1000}k"
    print(f"{title}, {steps:,} env steps per run. Command: "
          f"`{' '.join(shlex.quote(a) for a in sys.argv)}`; each run is")
    print(f"`{args.spur} local --config CONFIG --run-dir DIR --set run.seed=SEED "
          "--set reward_service.store=DIR/labels.redb` plus the variant's `--set`s.")
    print(f"Success and return are over the last 100 episodes; 'lowest, {last}' is the lowest")
    print(f"success over the {last} env steps; runs that never reach {pct}% count at the full budget.\n")
    print(f"| variant | seed | final success | lowest, {last} | env steps to {pct}% | "
          "final return | episodes | judge calls |")
    print("|---|---|---|---|---|---|---|---|")
    for name, seed, s, judge in results:
        hit = f"{s['hit']:,}" if s["hit"] is not None else "never"
        print(f"| {name} | {seed} | {s['final']:.2f} | {s['stay_up']:.2f} | {hit} | "
              f"{s['return']:.2f} | {s['episodes']} | {judge.get('llm_calls', '-')} |")
    print("\nIQM over seeds with a 95% percentile bootstrap interval (10,000 resamples of the seeds):\n")
    print(f"| variant | seeds | final >= {pct}% | IQM final success | IQM lowest, {last} | "
          f"reached {pct}% | IQM env steps to {pct}% (millions) | IQM final return |")
    print("|---|---|---|---|---|---|---|---|")
    for name in dict.fromkeys(r[0] for r in results):
        ss = [r[2] for r in results if r[0] == name]
        final = [s["final"] for s in ss]
        print(f"| {name} | {len(ss)} | {sum(f >= threshold for f in final)}/{len(ss)} | "
              f"{fmt_ci(final)} | {fmt_ci([s['stay_up'] for s in ss])} | "
              f"{sum(s['hit'] is not None for s in ss)}/{len(ss)} | "
              f"{fmt_ci([s['hit_or_budget'] for s in ss], scale=1e6)} | "
              f"{fmt_ci([s['return'] for s in ss])} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--table", choices=list(TABLES), default="rewards")
    ap.add_argument("--seeds", type=int, default=5,
                    help="seeds per variant (5 or more for meaningful intervals)")
    ap.add_argument("--first-seed", type=int, default=1)
    ap.add_argument("--steps", type=int, default=0,
                    help="env steps per run (default: each config's stop.env_steps)")
    ap.add_argument("--parallel", type=int, default=1, help="runs at the same time")
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--out", help="folder of the run directories (default: runs/table-TABLE)")
    ap.add_argument("--spur", default="target/release/spur")
    args = ap.parse_args()
    if args.seeds < 1:
        ap.error("--seeds must be at least 1")
    if args.seeds < 5:
        print(f"warning: {args.seeds} seeds per variant; intervals need 5 or more to mean much",
              file=sys.stderr)
    out = args.out or os.path.join("runs", f"table-{args.table}")
    title, variants = TABLES[args.table]
    jobs = []
    for v, (name, config, extra) in enumerate(variants):
        steps = budget(args, config, extra)
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            jobs.append((name, config, extra, seed,
                         os.path.join(out, f"variant{v}-seed{seed}"), steps))
    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        outcomes = list(pool.map(lambda j: run_one(args, j), jobs))
    results = [
        (name, seed, summarise(rows, steps, args.threshold), judge)
        for (name, _, _, seed, _, steps), (rows, judge) in zip(jobs, outcomes)
    ]
    print_tables(args, title, results, args.threshold, max(j[5] for j in jobs))
    print(f"\nrun directories: {out}")
    plot_bands(args, out, variants, jobs)


def plot_bands(args, out, variants, jobs):
    """One curve per variant over its seeds (mean, band from lowest to highest)."""
    png = os.path.join(out, "curves.png")
    done = [j[4] for j in jobs if read_rows(j[4])]
    if not done:
        return
    r = subprocess.run([args.spur, "plot", "--band", *done, "--out", png],
                       capture_output=True, text=True)
    if r.returncode != 0:
        print(f"spur plot failed: {r.stderr.strip()}", file=sys.stderr)
        return
    names = ", ".join(f"variant{v} = {name}" for v, (name, _, _) in enumerate(variants))
    print(f"curves (mean over seeds, band from lowest to highest): {png} ({names})")


if __name__ == "__main__":
    main()
