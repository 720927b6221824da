#!/usr/bin/env python3
"""spur against Sample Factory 2.1.1, one system after the other in one run, on
CartPole-v1 and NetHackScore-v0 with matched settings; prints one markdown table.
`spur bench peer` runs this script with its own binary as --spur.

Tasks:
  - cartpole: spur's own Rust CartPole (configs/cartpole.toml),
  - gym-cartpole: Gymnasium's CartPole-v1 in spur's env bridge, one Python bridge
    process per actor (configs/gym-cartpole.toml, the same learner settings),
  - nethack: NetHackScore-v0 through the env bridge (configs/nethack-score.toml).
Sample Factory runs its CartPole-v1 for both CartPole tasks. gym-cartpole reuses the
Sample Factory run of the same seed from cartpole when this invocation made one (the
table says so), and runs it itself otherwise.

For each task and seed it runs spur (`spur local` with the task's config) and then
Sample Factory (`scripts/peer_sf.py` in the peer venv), and reads:
  - env steps/s, from the first training step to the last (start-up left out),
  - CartPole tasks only: env steps at which the mean return of the last 100 episodes
    first reached 475 (both runs stop there; a run that never does counts as missing),
  - the mean return of the last 100 episodes when each run stopped (for NetHack, what
    each learned in the same env steps).
Ratios are spur / Sample Factory per seed; the table gives the median over seeds.

Matched on both sides: 2 workers (actors) x 16 envs, rollout 32, batch (4096 for
CartPole, 2048 for NetHack), minibatches, epochs, learning rate, discount, GAE lambda
0.95, clip 0.2, value and entropy coefficients, gradient clip 0.5, one torch thread
per process, the network (CartPole: separate 64x64 tanh MLPs; NetHack: spur's
network, shared torso), no observation normalisation, CPU, and on NetHack value
targets normalised by their running statistics (configs/nethack-score.toml). spur runs GAE too
(`learner.advantage=gae`, since Sample Factory's V-trace crashes in 2.1.1), on NetHack
from the actors' values as Sample Factory does (`learner.actor_estimates=true`; with
--learner-estimates spur's learner recomputes values and log-probabilities over each
batch first, one forward pass more per update, as it does on CartPole), and no
intrinsic reward. What differs is in docs/benchmarks.md.

The peer venv (runs/peer-venv by default) is made by `make bench-peer`; with
--install this script makes it itself.

Usage: scripts/peer_bench.py [--seeds 3] [--first-seed 1] [--cartpole-steps 400000]
           [--nethack-steps 100000] [--nethack-seeds 1]
           [--tasks cartpole,gym-cartpole,nethack] [--learner-estimates]
           [--out runs/peer]
           [--spur target/release/spur] [--venv runs/peer-venv] [--install]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from keyroom_table import read_rows  # noqa: E402  (tolerates a torn last line)

PINS = ["sample-factory==2.1.1", "gymnasium==0.29.1", "nle==1.0.0", "torch==2.13.0", "numpy<2"]
TARGET = 475.0

# NetHack: GAE as Sample Factory runs it, from the values the actors computed when
# they acted, with their log-probabilities as PPO's old policy (no learner pass over
# the batch before each update: 1.24x the env steps/s). CartPole keeps the learner's
# pass, which costs it no speed and saves steps: with the actors' estimates spur
# needed 127k-147k steps to 475 against 94k-106k (3 seeds each, 2026-11-30).
# --learner-estimates drops the key.
GAE = ["learner.advantage=gae"]
ACTOR_ESTIMATES = "learner.actor_estimates=true"

# task -> (config, spur overrides, Sample Factory task name). configs/gym-cartpole.toml
# has configs/cartpole.toml's learner settings but V-trace, the default estimator; the
# override gives both spur rows GAE, as Sample Factory runs.
TASKS = {
    "cartpole": ("configs/cartpole.toml", GAE, "cartpole"),
    "gym-cartpole": ("configs/gym-cartpole.toml", GAE, "cartpole"),
    "nethack": (
        "configs/nethack-score.toml",
        GAE + [ACTOR_ESTIMATES, "intrinsic.enabled=false", "learner.device=cpu",
               "model.device=cpu"],
        "nethack",
    ),
}
# Tasks run to a mean return of TARGET, with the steps-to-target columns.
SOLVED = {task for task, (_, _, sf) in TASKS.items() if sf == "cartpole"}


def install(venv):
    py = os.path.join(venv, "bin", "python")
    if not os.path.exists(py):
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    subprocess.run([py, "-m", "pip", "install", "--quiet", "--no-cache-dir", *PINS], check=True)


def spur_run(args, task, seed, steps, run_dir):
    config, sets, _ = TASKS[task]
    cmd = [args.spur, "local", "--config", config, "--run-dir", run_dir,
           "--set", f"run.seed={seed}", "--set", f"stop.env_steps={steps}"]
    if task in SOLVED:
        cmd += ["--set", f"stop.target_return={TARGET}"]
    for s in sets:
        if args.learner_estimates and s == ACTOR_ESTIMATES:
            continue
        cmd += ["--set", s]
    with open(os.path.join(run_dir, "bench.log"), "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    rows = read_rows(run_dir)
    first, last = rows[0], rows[-1]
    dt = last["time_s"] - first["time_s"]
    reached = [r["env_steps"] for r in rows
               if r.get("episodes", 0) >= 100 and r["episode_return_mean"] >= TARGET]
    return {
        "system": "spur", "task": task, "seed": seed, "env_steps": last["env_steps"],
        "seconds": dt,
        "steps_per_sec": (last["env_steps"] - first["env_steps"]) / dt if dt > 0 else None,
        "steps_to_target": reached[0] if reached else None,
        "return_mean": last["episode_return_mean"],
    }


def sf_run(args, task, seed, steps, run_dir):
    py = os.path.join(args.venv, "bin", "python")
    here = os.path.dirname(os.path.abspath(__file__))
    cmd = [py, os.path.join(here, "peer_sf.py"), "--task", TASKS[task][2], "--seed", str(seed),
           "--env-steps", str(steps), "--train-dir", run_dir]
    if task in SOLVED:
        cmd += ["--target-return", str(TARGET)]
    with open(os.path.join(run_dir, "bench.log"), "w") as log:
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"sample factory failed (exit {out.returncode}); see {run_dir}/bench.log")
    return json.loads(lines[-1])


def reusable(results, task, seed):
    """(task, result) of a Sample Factory run of the same seed made earlier in this
    invocation for another task with the same Sample Factory task, or (None, None)."""
    for other, (_, _, sf) in TASKS.items():
        earlier = results.get((other, seed, "sf"))
        if other != task and sf == TASKS[task][2] and earlier and "reused_from" not in earlier:
            return other, earlier
    return None, None


def machine():
    """The date, the cores and the load: rates mean little without them."""
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, load {load}"


def fmt_int(x):
    return "-" if x is None else f"{x:,.0f}"


def fmt_float(x):
    return "-" if x is None or x != x else f"{x:.1f}"


def fmt_return(run):
    """A run's mean return over its last 100 episodes when it stopped."""
    return fmt_float(run and run.get("return_mean"))


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def table(results, seeds):
    out = ["| task | seed | spur env steps/s | Sample Factory env steps/s | ratio "
           "| spur steps to 475 | SF steps to 475 | ratio | spur return | SF return |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    notes = []
    for task in TASKS:
        rows = [(s, results.get((task, s, "spur")), results.get((task, s, "sf"))) for s in seeds]
        rows = [r for r in rows if r[1] or r[2]]
        if not rows:
            continue
        speed, solve = [], []
        for seed, a, b in rows:
            ra = a and a["steps_per_sec"]
            rb = b and b["steps_per_sec"]
            speed.append(ra / rb if ra and rb else None)
            ta = a and a["steps_to_target"]
            tb = b and b["steps_to_target"]
            solve.append(ta / tb if ta and tb else None)
            cart = task in SOLVED
            out.append(
                f"| {task} | {seed} | {fmt_int(ra)} | {fmt_int(rb)} | "
                f"{'-' if speed[-1] is None else f'{speed[-1]:.2f}x'} | "
                f"{fmt_int(ta) if cart else ''} | {fmt_int(tb) if cart else ''} | "
                f"{('-' if solve[-1] is None else f'{solve[-1]:.2f}x') if cart else ''} | "
                f"{fmt_return(a)} | {fmt_return(b)} |")
        ma = median([a and a["steps_per_sec"] for _, a, _ in rows])
        mb = median([b and b["steps_per_sec"] for _, _, b in rows])
        ms = median(speed)
        cart = task in SOLVED
        ta = median([a and a["steps_to_target"] for _, a, _ in rows])
        tb = median([b and b["steps_to_target"] for _, _, b in rows])
        mt = median(solve)
        out.append(
            f"| **{task}** | median | {fmt_int(ma)} | {fmt_int(mb)} | "
            f"{'-' if ms is None else f'**{ms:.2f}x**'} | {fmt_int(ta) if cart else ''} | "
            f"{fmt_int(tb) if cart else ''} | "
            f"{('-' if mt is None else f'**{mt:.2f}x**') if cart else ''} | "
            f"{fmt_float(median([a and a['return_mean'] for _, a, _ in rows]))} | "
            f"{fmt_float(median([b and b['return_mean'] for _, _, b in rows]))} |")
        reused = sorted({b["reused_from"] for _, _, b in rows if b and "reused_from" in b})
        for other in reused:
            notes.append(f"{task}: the Sample Factory columns are the {other} rows' runs "
                         "of the same seeds (one Sample Factory run serves both).")
    return "\n".join(out + ([""] + notes if notes else []))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=1)
    ap.add_argument("--cartpole-steps", type=int, default=400_000,
                    help="CartPole step budget per run (runs stop earlier at 475)")
    ap.add_argument("--nethack-steps", type=int, default=100_000,
                    help="NetHack steps per run (about 1-2 minutes each on 2 cores)")
    ap.add_argument("--nethack-seeds", type=int, default=1)
    ap.add_argument("--tasks", default="cartpole,gym-cartpole,nethack",
                    help=f"comma-separated, of: {', '.join(TASKS)}")
    ap.add_argument("--learner-estimates", action="store_true",
                    help="spur's learner recomputes values and log-probabilities over "
                         "each batch (not the actors'), as before")
    ap.add_argument("--out", default="runs/peer")
    ap.add_argument("--spur", default="target/release/spur")
    ap.add_argument("--venv", default="runs/peer-venv")
    ap.add_argument("--install", action="store_true", help="make the peer venv first")
    args = ap.parse_args()
    if args.install:
        install(args.venv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    started = machine()
    base = os.path.join(args.out, stamp)
    results = {}
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    tasks = args.tasks.split(",")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        ap.error(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    for task in tasks:
        steps = args.cartpole_steps if task in SOLVED else args.nethack_steps
        task_seeds = seeds if task in SOLVED else seeds[: args.nethack_seeds]
        for seed in task_seeds:
            for system, fn in (("spur", spur_run), ("sf", sf_run)):
                other, earlier = reusable(results, task, seed) if system == "sf" else (None, None)
                if earlier:
                    results[(task, seed, system)] = dict(earlier, reused_from=other)
                    print(f"{task} {system} seed {seed}: the {other} run of this seed", flush=True)
                    continue
                run_dir = os.path.abspath(os.path.join(base, f"{task}-{system}-seed{seed}"))
                os.makedirs(run_dir, exist_ok=True)
                t = time.monotonic()
                try:
                    r = fn(args, task, seed, steps, run_dir)
                except (subprocess.CalledProcessError, RuntimeError, OSError, KeyError) as e:
                    print(f"{task} {system} seed {seed}: failed: {e}", flush=True)
                    continue
                results[(task, seed, system)] = r
                print(f"{task} {system} seed {seed}: {fmt_int(r['steps_per_sec'])} env steps/s, "
                      f"to 475: {fmt_int(r['steps_to_target'])}, "
                      f"final return {r['return_mean']:.1f} ({time.monotonic() - t:.0f} s)",
                      flush=True)
    with open(os.path.join(base, "results.json"), "w") as f:
        json.dump(list(results.values()), f, indent=1)
    print()
    print(table(results, seeds))
    print(f"\nstart: {started}\nend:   {machine()}")
    print(f"\nruns: {base}")


if __name__ == "__main__":
    main()
