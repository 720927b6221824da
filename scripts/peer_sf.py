"""Sample Factory 2 on spur's CartPole and NetHack set-ups, for `scripts/peer_bench.py`.

Runs in the peer venv (sample-factory 2.1.1, gymnasium 0.29.1, nle 1.0.0), never in the
project's. One run per call; it prints one JSON line at the end:

    {"system": "sample-factory", "task": ..., "seed": ..., "env_steps": ...,
     "seconds": ..., "steps_per_sec": ..., "steps_to_target": ... or null,
     "return_mean": ...}

The settings mirror spur's configs (configs/cartpole.toml, configs/nethack-score.toml):
envs per worker and workers (spur's envs per actor and actors), rollout length, batch as
minibatch size times minibatches, epochs, learning rate, discount, GAE lambda, clip
ratio, value and entropy coefficients, gradient clipping, one torch thread per process,
and the network: for CartPole separate 64x64 tanh MLPs for policy and value, for
NetHack spur's network layer for layer (below), shared by both heads.

steps/s runs from the first training step to the last, so start-up is left out, as
spur's learner rows do.
"""

import argparse
import json
import math
import sys
import time

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from sample_factory.algo.runners.runner import AlgoObserver
from sample_factory.algo.utils.context import global_model_factory
from sample_factory.cfg.arguments import parse_full_cfg, parse_sf_args
from sample_factory.envs.env_utils import register_env
from sample_factory.model.encoder import Encoder
from sample_factory.train import make_runner
from sample_factory.algo.utils.misc import ExperimentStatus

# NetHack's largest glyph id ("nothing"), which also pads the crop outside the map.
MAX_GLYPH = 5976
CROP = 9


class GlyphCrop(gym.ObservationWrapper):
    """NLE's glyphs, bottom-line stats and message, turned into spur's three fields: a
    CROP x CROP square of glyph ids centred on the hero (padded with MAX_GLYPH), the
    stats, and the message bytes, all float32."""

    def __init__(self, env):
        super().__init__(env)
        from nle import nethack

        rows, cols = env.observation_space["glyphs"].shape
        half = CROP // 2
        self.x_at, self.y_at = nethack.NLE_BL_X, nethack.NLE_BL_Y
        self.board = np.full((rows + 2 * half, cols + 2 * half), MAX_GLYPH, dtype=np.float32)
        n_stats = env.observation_space["blstats"].shape[0]
        n_msg = env.observation_space["message"].shape[0]
        big = np.finfo(np.float32).max
        self.observation_space = gym.spaces.Dict(
            {
                "glyphs_crop": gym.spaces.Box(0, MAX_GLYPH, (CROP, CROP), np.float32),
                "blstats": gym.spaces.Box(-big, big, (n_stats,), np.float32),
                "message": gym.spaces.Box(0, 255, (n_msg,), np.float32),
            }
        )

    def observation(self, obs):
        half = CROP // 2
        g = obs["glyphs"]
        self.board[half : half + g.shape[0], half : half + g.shape[1]] = g
        x, y = int(obs["blstats"][self.x_at]), int(obs["blstats"][self.y_at])
        return {
            "glyphs_crop": self.board[y : y + CROP, x : x + CROP].copy(),
            "blstats": obs["blstats"].astype(np.float32),
            "message": obs["message"].astype(np.float32),
        }


def make_cartpole(full_env_name, cfg=None, env_config=None, render_mode=None):
    return gym.make("CartPole-v1", render_mode=render_mode)


def make_nethack_score(full_env_name, cfg=None, env_config=None, render_mode=None):
    import nle  # noqa: F401  (registers the NetHack ids)

    env = gym.make("NetHackScore-v0", observation_keys=("glyphs", "blstats", "message"))
    return GlyphCrop(env)


class SpurNetHackEncoder(Encoder):
    """spur's NetHack torso (core/src/model.rs), the same layers and widths: glyph
    embedding 16 -> conv 3x3 32 -> conv 3x3 32 -> linear 256; signed-log stats ->
    linear 64; byte embedding 16 -> conv1d width 8 stride 4, 64 channels -> max over
    positions; the three joined by one linear layer of `core` units. ELU throughout."""

    def __init__(self, cfg, obs_space, core=256):
        super().__init__(cfg)
        n_stats = obs_space["blstats"].shape[0]
        self.glyph_emb = nn.Embedding(MAX_GLYPH + 1, 16)
        self.conv1 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.crop_fc = nn.Linear(32 * CROP * CROP, 256)
        self.stats_fc = nn.Linear(n_stats, 64)
        self.msg_emb = nn.Embedding(256, 16)
        self.msg_conv = nn.Conv1d(16, 64, 8, stride=4)
        self.core = nn.Linear(256 + 64 + 64, core)
        self.out_size = core

    def get_out_size(self):
        return self.out_size

    def forward(self, obs):
        elu = nn.functional.elu
        glyphs = obs["glyphs_crop"].long().clamp(0, MAX_GLYPH)
        g = self.glyph_emb(glyphs).permute(0, 3, 1, 2)
        g = elu(self.conv2(elu(self.conv1(g))))
        g = elu(self.crop_fc(g.flatten(1)))
        s = obs["blstats"]
        s = elu(self.stats_fc(torch.sign(s) * torch.log1p(s.abs())))
        m = self.msg_emb(obs["message"].long().clamp(0, 255)).permute(0, 2, 1)
        m = elu(self.msg_conv(m)).amax(-1)
        return elu(self.core(torch.cat([g, s, m], 1)))


def make_encoder(cfg, obs_space):
    return SpurNetHackEncoder(cfg, obs_space)


# Shared between both tasks: spur's learner settings that Sample Factory has too.
COMMON = [
    "--algo=APPO",
    "--device=cpu",
    "--use_rnn=False",
    "--recurrence=1",
    "--with_vtrace=False",  # V-trace crashes in 2.1.1
    "--rollout=32",
    "--gae_lambda=0.95",
    "--ppo_clip_ratio=0.2",
    "--value_loss_coeff=0.5",
    "--normalize_input=False",
    "--policy_workers_per_policy=1",
    "--worker_num_splits=2",
    "--set_workers_cpu_affinity=False",
    "--save_every_sec=100000",
    "--save_best_every_sec=100000",
    "--keep_checkpoints=1",
    "--experiment_summaries_interval=100000",
    "--with_wandb=False",
    "--restart_behavior=overwrite",
]

TASKS = {
    # configs/cartpole.toml: 2 actors x 16 envs, batch 4096 in 16 minibatches, 4 epochs.
    "cartpole": [
        "--env=peer_cartpole",
        "--num_workers=2",
        "--num_envs_per_worker=16",
        "--batch_size=256",
        "--num_batches_per_epoch=16",
        "--num_epochs=4",
        "--learning_rate=0.001",
        "--gamma=0.99",
        "--exploration_loss_coeff=0.0",
        "--max_grad_norm=0.5",
        "--actor_critic_share_weights=False",
        "--nonlinearity=tanh",
        "--encoder_mlp_layers",
        "64",
        "64",
    ],
    # configs/nethack-score.toml: 2 actors x 16 envs, batch 2048 in 4 minibatches, 2 epochs.
    "nethack": [
        "--env=peer_nethack_score",
        "--num_workers=2",
        "--num_envs_per_worker=16",
        "--batch_size=512",
        "--num_batches_per_epoch=4",
        "--num_epochs=2",
        "--learning_rate=0.0003",
        "--gamma=0.999",
        "--exploration_loss_coeff=0.01",
        "--max_grad_norm=0.5",
        "--actor_critic_share_weights=True",
        "--nonlinearity=elu",
    ],
}


class Watch(AlgoObserver):
    """Times training from the first training step on and notes the env steps at which
    the mean return of the last 100 episodes first reaches the target."""

    def __init__(self, target):
        self.target = target
        self.first = None
        self.last = None
        self.steps_to_target = None
        self.return_mean = math.nan

    def on_training_step(self, runner, training_iteration_since_resume):
        steps = sum(runner.env_steps.values())
        now = time.monotonic()
        if self.first is None:
            self.first = (now, steps)
        self.last = (now, steps)
        rewards = runner.policy_avg_stats.get("reward")
        if rewards and len(rewards[0]) > 0:
            self.return_mean = float(np.mean(rewards[0]))
            full = len(rewards[0]) >= runner.cfg.stats_avg
            if self.target and full and self.return_mean >= self.target and self.steps_to_target is None:
                self.steps_to_target = steps
                runner._stop_training()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=sorted(TASKS), required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--env-steps", type=int, required=True, help="step budget")
    p.add_argument("--target-return", type=float, default=0.0, help="stop at this mean return (0: off)")
    p.add_argument("--train-dir", default="runs/peer-sf")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more Sample Factory flags")
    args = p.parse_args()

    torch.set_num_threads(1)
    register_env("peer_cartpole", make_cartpole)
    register_env("peer_nethack_score", make_nethack_score)
    if args.task == "nethack":
        global_model_factory().register_encoder_factory(make_encoder)
    argv = [
        *COMMON,
        *TASKS[args.task],
        f"--seed={args.seed}",
        f"--train_for_env_steps={args.env_steps}",
        f"--train_dir={args.train_dir}",
        f"--experiment={args.task}-seed{args.seed}",
        *args.extra,
    ]
    parser, _ = parse_sf_args(argv=argv)
    cfg = parse_full_cfg(parser, argv)
    cfg, runner = make_runner(cfg)
    watch = Watch(args.target_return)
    runner.register_observer(watch)
    status = runner.init()
    if status == ExperimentStatus.SUCCESS:
        status = runner.run()
    (t0, s0), (t1, s1) = watch.first or (0, 0), watch.last or (0, 0)
    seconds = t1 - t0
    print(
        json.dumps(
            {
                "system": "sample-factory",
                "task": args.task,
                "seed": args.seed,
                "env_steps": s1,
                "seconds": seconds,
                "steps_per_sec": (s1 - s0) / seconds if seconds > 0 else None,
                "steps_to_target": watch.steps_to_target,
                "return_mean": watch.return_mean,
                "status": int(status),
            }
        ),
        flush=True,
    )
    return 0 if status == ExperimentStatus.SUCCESS else 1


if __name__ == "__main__":
    sys.exit(main())
