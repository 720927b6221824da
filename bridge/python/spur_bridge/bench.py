"""`python -m spur_bridge.bench --env-id ID [--num-envs K] [--seconds S] [--all-keys]`

The baseline for `spur bench bridge`: K envs stepped by a plain Python loop with
uniformly random actions (episodes reset as they end), no gRPC, no policy. Prints
one line, `steps_per_sec <float>`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="spur_bridge.bench")
    p.add_argument("--env-id", required=True)
    p.add_argument("--num-envs", type=int, default=16)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument(
        "--all-keys",
        action="store_true",
        help="NetHack: every observation NLE computes, not only the bridge's three",
    )
    args = p.parse_args(argv)

    from .envs import make_env

    keys = None if args.all_keys else ("glyphs", "blstats", "message")
    envs = [make_env(args.env_id, nethack_keys=keys) for _ in range(args.num_envs)]
    for i, e in enumerate(envs):
        e.reset(seed=i)
    n_actions = int(envs[0].action_space.n)
    rng = np.random.default_rng(0)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        actions = rng.integers(0, n_actions, size=(64, len(envs)))
        for row in actions:
            for e, a in zip(envs, row):
                _, _, term, trunc, _ = e.step(int(a))
                if term or trunc:
                    e.reset()
        steps += actions.size
    print(f"steps_per_sec {steps / (time.perf_counter() - start):.1f}", flush=True)


if __name__ == "__main__":
    main()
