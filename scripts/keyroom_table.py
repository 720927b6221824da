#!/usr/bin/env python3
"""Success rates and returns, several seeds per variant, the same env-step budget
for every run. Prints a markdown table.

  --table rewards     keyroom: extrinsic only vs ONI retrieval, classification, ranking
  --table advantages  keyroom: vtrace, gae, uis1, hybrid (all with ONI retrieval
                      rewards and groups of 4 episodes)
  --table nethack-score | nethack-staircase | nethack-oracle
                      NetHack through the env bridge: extrinsic only vs ONI retrieval,
                      classification, ranking (configs/nethack-*.toml)

Usage: scripts/keyroom_table.py [--table rewards] [--seeds 3] [--steps 1000000]
                                [--spur target/release/spur]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

VARIANTS = [
    ("extrinsic only", "configs/keyroom.toml", []),
    ("ONI retrieval (rule judge)", "configs/keyroom-oni.toml", []),
    (
        "ONI classification (rule judge)",
        "configs/keyroom-oni.toml",
        ["--set", "intrinsic.model=classification"],
    ),
    (
        "ONI ranking (rule judge)",
        "configs/keyroom-oni.toml",
        ["--set", "intrinsic.model=ranking"],
    ),
]


GROUPED = ["--set", "actor.group_size=4"]
ADVANTAGES = [
    (f"{name} (ONI retrieval)", "configs/keyroom-oni.toml",
     GROUPED + ["--set", f"learner.advantage={name}"])
    for name in ["vtrace", "gae", "uis1", "hybrid"]
]


def nethack_variants(task):
    config = f"configs/nethack-{task}.toml"
    return [
        ("extrinsic only", config, ["--set", "intrinsic.enabled=false"]),
        ("ONI retrieval (rule judge)", config, []),
        ("ONI classification (rule judge)", config, ["--set", "intrinsic.model=classification"]),
        ("ONI ranking (rule judge)", config, ["--set", "intrinsic.model=ranking"]),
    ]


TABLES = ["rewards", "advantages", "nethack-score", "nethack-staircase", "nethack-oracle"]


def last_row(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows


def first_reaching(rows, rate):
    for r in rows:
        if r["episodes"] >= 100 and r["success_rate"] >= rate:
            return r["env_steps"]
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1_000_000)
    ap.add_argument("--spur", default="target/release/spur")
    ap.add_argument("--table", choices=TABLES, default="rewards")
    args = ap.parse_args()
    if args.table == "rewards":
        variants = VARIANTS
    elif args.table == "advantages":
        variants = ADVANTAGES
    else:
        variants = nethack_variants(args.table.split("-", 1)[1])
    out = tempfile.mkdtemp(prefix="spur-keyroom-table-")
    store = os.path.join(out, "labels.redb")
    results = []
    for v, (name, config, extra) in enumerate(variants):
        for seed in range(1, args.seeds + 1):
            run_dir = os.path.join(out, f"variant{v}-seed{seed}")
            cmd = [
                args.spur, "local", "--config", config, "--run-dir", run_dir,
                "--set", f"run.seed={seed}",
                "--set", f"stop.env_steps={args.steps}",
                "--set", f"reward_service.store={store}",
            ] + extra
            print(f"running {name}, seed {seed} ...", file=sys.stderr, flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rows = last_row(run_dir)
            judge = {}
            jpath = os.path.join(run_dir, "reward_service.json")
            if os.path.exists(jpath):
                with open(jpath) as f:
                    judge = json.load(f)
            results.append((name, seed, rows, judge))
    if args.table.startswith("nethack"):
        print(f"{args.table}, {args.steps:,} env steps per run; one label store shared by all runs\n")
        print("| variant | seed | mean return (last 100 episodes) | success rate | episodes | judge calls |")
        print("|---|---|---|---|---|---|")
        for name, seed, rows, judge in results:
            r = rows[-1]
            print(
                f"| {name} | {seed} | {r['episode_return_mean']:.2f} | {r['success_rate']:.2f} | "
                f"{r['episodes']} | {judge.get('llm_calls', '-')} |"
            )
        print(f"\nrun directories: {out}")
        return
    print(f"keyroom 15x15, 200-step limit, {args.steps:,} env steps per run; one label")
    print("store shared by all runs, so only the first ONI run calls the judge\n")
    print("| variant | seed | success rate (last 100 episodes) | env steps to 80% | judge calls | labelled texts | ranked pairs | calls per labelled text |")
    print("|---|---|---|---|---|---|---|---|")
    for name, seed, rows, judge in results:
        hit = first_reaching(rows, 0.8)
        print(
            f"| {name} | {seed} | {rows[-1]['success_rate']:.2f} | "
            f"{f'{hit:,}' if hit else 'never'} | {judge.get('llm_calls', '-')} | "
            f"{judge.get('labels', '-')} | {judge.get('ranked_pairs', 0)} | "
            f"{judge['calls_per_labelled_text']:.2f} |" if judge else
            f"| {name} | {seed} | {rows[-1]['success_rate']:.2f} | "
            f"{f'{hit:,}' if hit else 'never'} | - | - | - | - |"
        )
    print(f"\nrun directories: {out}")


if __name__ == "__main__":
    main()
