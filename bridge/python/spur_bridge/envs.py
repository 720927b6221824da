"""K environments of one id, reset and stepped together, with flat float32
observations.

Two adapters decide what an observation is:

- any Gymnasium env with a Discrete action space: its observation (a Box, a Discrete
  as one-hot, or a Dict of those) flattened in a fixed field order; the event text is
  `info["event_text"]` when the env provides one;
- NetHack and MiniHack (ids starting with `NetHack` or `MiniHack`): a square crop of
  glyph ids around the hero, the bottom-line stats and the message bytes; the event
  text is the message, and success is NLE's `TASK_SUCCESSFUL` end status.

An env whose episode ends keeps its last observation until it is reset: the caller
chooses every episode's seed (spur's grouped rollouts need that).
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np


class BridgeError(Exception):
    """A request the batch cannot serve; `code` names the gRPC status."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Field:
    name: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def _is_nethack(env_id: str) -> bool:
    return env_id.startswith(("NetHack", "MiniHack"))


class GymAdapter:
    """Flattens a Box, Discrete or Dict observation into float32 fields."""

    def __init__(self, space: gym.Space):
        self.parts = []  # (field, key or None, kind)
        if isinstance(space, gym.spaces.Dict):
            for key in sorted(space.spaces):
                self.parts.append(self._part(key, key, space.spaces[key]))
        else:
            self.parts.append(self._part("obs", None, space))
        self.fields = [f for f, _, _ in self.parts]

    @staticmethod
    def _part(name, key, space):
        if isinstance(space, gym.spaces.Box):
            return Field(name, tuple(int(d) for d in space.shape)), key, "box"
        if isinstance(space, gym.spaces.Discrete):
            return Field(name, (int(space.n),)), key, "onehot"
        raise BridgeError(
            "INVALID_ARGUMENT",
            f"observation part {name!r} is a {type(space).__name__}; the bridge "
            "takes Box, Discrete and Dict observations",
        )

    def encode(self, obs, out: np.ndarray) -> None:
        if len(self.parts) == 1 and self.parts[0][2] == "box":
            out[:] = np.ravel(obs)  # the common case: one Box
            return
        at = 0
        for field, key, kind in self.parts:
            value = obs if key is None else obs[key]
            n = field.size
            if kind == "onehot":
                out[at : at + n] = 0.0
                out[at + int(value)] = 1.0
            else:
                out[at : at + n] = np.asarray(value, dtype=np.float32).reshape(-1)
            at += n

    @staticmethod
    def reset(env, seed: int):
        return env.reset(seed=seed)

    @staticmethod
    def render(obs) -> str:
        return ""

    @staticmethod
    def text(obs, info) -> str:
        return str(info.get("event_text", "") or "")

    @staticmethod
    def success(terminated, info) -> bool:
        return bool(terminated and (info.get("is_success") or info.get("success")))


class NetHackAdapter:
    """Glyph crop around the hero, bottom-line stats and message bytes."""

    # `chars` is not sent to the actor; it draws the map for `render`.
    KEYS = ("glyphs", "blstats", "message", "chars")

    def __init__(self, space: gym.Space, crop: int):
        from nle import nethack

        if crop < 1 or crop % 2 == 0:
            raise BridgeError("INVALID_ARGUMENT", f"the glyph crop must be odd, not {crop}")
        self.crop = crop
        self.pad = nethack.MAX_GLYPH  # "nothing here", outside the map
        self.x_index, self.y_index = nethack.NLE_BL_X, nethack.NLE_BL_Y
        rows, cols = space["glyphs"].shape
        self.padded = np.full((rows + crop - 1, cols + crop - 1), self.pad, dtype=np.float32)
        self.n_stats = int(space["blstats"].shape[0])
        self.n_message = int(space["message"].shape[0])
        self.fields = [
            Field("glyphs_crop", (crop, crop)),
            Field("blstats", (self.n_stats,)),
            Field("message", (self.n_message,)),
        ]

    def encode(self, obs, out: np.ndarray) -> None:
        c, h = self.crop, self.crop // 2
        glyphs = obs["glyphs"]
        self.padded[h : h + glyphs.shape[0], h : h + glyphs.shape[1]] = glyphs
        x, y = int(obs["blstats"][self.x_index]), int(obs["blstats"][self.y_index])
        # In padded coordinates the hero sits at (y + h, x + h): the crop starts at (y, x).
        out[: c * c] = self.padded[y : y + c, x : x + c].reshape(-1)
        out[c * c : c * c + self.n_stats] = obs["blstats"]
        out[c * c + self.n_stats :] = obs["message"]

    @staticmethod
    def reset(env, seed: int):
        # NLE ignores Gymnasium's `reset(seed=...)`; its game RNGs are seeded here, so
        # one seed gives one dungeon (spur's grouped rollouts rely on that).
        disp = (seed * 0x9E3779B97F4A7C15 + 1) % 2**63
        env.unwrapped.seed(core=seed, disp=disp, reseed=False)
        return env.reset()

    @staticmethod
    def render(obs) -> str:
        """The map as NetHack draws it (blank rows above and below cut) and the main
        stats; the message is the step's event text, shown by the caller."""
        rows = [bytes(r).decode("latin-1").rstrip() for r in obs["chars"]]
        while rows and not rows[-1]:
            rows.pop()
        while rows and not rows[0]:
            rows.pop(0)
        b = obs["blstats"]
        stats = f"HP {b[10]}/{b[11]}  depth {b[12]}  gold {b[13]}  XL {b[18]}  turn {b[20]}"
        return "\n".join([*rows, stats])

    @staticmethod
    def text(obs, info) -> str:
        raw = bytes(obs["message"]).split(b"\0", 1)[0]
        return " ".join(raw.decode("latin-1").split())

    @staticmethod
    def success(terminated, info) -> bool:
        # NLE tasks report TASK_SUCCESSFUL (2) as their end status on reaching the goal.
        return bool(terminated and int(info.get("end_status", 0)) == 2)


def make_env(env_id: str, max_episode_steps: int = 0, nethack_keys=NetHackAdapter.KEYS):
    """One env of `env_id`. NetHack and MiniHack compute only `nethack_keys` (None:
    every observation NLE has)."""
    kwargs = {}
    if _is_nethack(env_id):
        import nle  # noqa: F401  (registers the NetHack ids)

        if env_id.startswith("MiniHack"):
            import minihack  # noqa: F401  (registers the MiniHack ids)
        if nethack_keys is not None:
            kwargs["observation_keys"] = nethack_keys
    if max_episode_steps > 0:
        kwargs["max_episode_steps"] = max_episode_steps
    try:
        return gym.make(env_id, **kwargs)
    except gym.error.Error as e:
        raise BridgeError("NOT_FOUND", f"unknown environment id {env_id!r}: {e}") from e


class Batch:
    """K envs of one id with one float32 buffer of `K * obs_dim` observations."""

    def __init__(self, env_id: str, num_envs: int, crop: int = 9, max_episode_steps: int = 0):
        if num_envs < 1:
            raise BridgeError("INVALID_ARGUMENT", "num_envs must be at least 1")
        self.env_id = env_id
        self.envs = [make_env(env_id, max_episode_steps) for _ in range(num_envs)]
        first = self.envs[0]
        if not isinstance(first.action_space, gym.spaces.Discrete):
            raise BridgeError(
                "INVALID_ARGUMENT",
                f"{env_id} acts in a {type(first.action_space).__name__} space; spur's "
                "policies take Discrete action spaces",
            )
        self.num_actions = int(first.action_space.n)
        if _is_nethack(env_id):
            self.adapter = NetHackAdapter(first.observation_space, crop)
            self.has_text = True
        else:
            self.adapter = GymAdapter(first.observation_space)
            self.has_text = False
        self.fields = self.adapter.fields
        self.obs_dim = sum(f.size for f in self.fields)
        spec = getattr(first, "spec", None)
        limit = getattr(spec, "max_episode_steps", None) or getattr(
            first.unwrapped, "_max_episode_steps", 0
        )
        self.max_episode_steps = int(limit or 0)
        self.obs = np.zeros((num_envs, self.obs_dim), dtype=np.float32)
        self.running = [False] * num_envs
        self.last = [None] * num_envs  # each env's latest raw observation

    @property
    def num_envs(self) -> int:
        return len(self.envs)

    def reset(self, indices, seeds) -> np.ndarray:
        """Resets the envs at `indices` (all when empty) with `seeds`; returns their
        first observations, in request order."""
        indices = list(range(self.num_envs)) if len(indices) == 0 else list(indices)
        if len(seeds) != len(indices):
            raise BridgeError(
                "INVALID_ARGUMENT",
                f"{len(indices)} envs to reset but {len(seeds)} seeds (one per env)",
            )
        for i in indices:
            if not 0 <= i < self.num_envs:
                raise BridgeError(
                    "INVALID_ARGUMENT", f"env index {i} is outside 0..{self.num_envs - 1}"
                )
        for i, seed in zip(indices, seeds):
            # Gymnasium seeds are at most 2**63 - 1 for some envs' numpy generators.
            obs, _ = self.adapter.reset(self.envs[i], int(seed) % (2**63))
            self.adapter.encode(obs, self.obs[i])
            self.last[i] = obs
            self.running[i] = True
        return self.obs[indices]

    def step(self, actions):
        """Steps every env; returns (observations, rewards, terminated, truncated,
        texts, success). An env whose episode ends keeps its last observation and
        must be reset before it is stepped again."""
        if len(actions) != self.num_envs:
            raise BridgeError(
                "INVALID_ARGUMENT",
                f"expected {self.num_envs} actions (one per env), got {len(actions)}",
            )
        acts = np.asarray(actions, dtype=np.int64)
        bad = np.flatnonzero((acts < 0) | (acts >= self.num_actions))
        if bad.size:
            i = int(bad[0])
            raise BridgeError(
                "INVALID_ARGUMENT",
                f"action {acts[i]} for env {i} is outside 0..{self.num_actions - 1}",
            )
        if not all(self.running):
            i = self.running.index(False)
            raise BridgeError(
                "FAILED_PRECONDITION", f"env {i} has no running episode: reset it first"
            )
        n = self.num_envs
        rewards = np.zeros(n, dtype=np.float32)
        terminated = [False] * n
        truncated = [False] * n
        success = [False] * n
        texts = [""] * n
        for i, (env, a) in enumerate(zip(self.envs, acts.tolist())):
            obs, reward, term, trunc, info = env.step(a)
            self.adapter.encode(obs, self.obs[i])
            self.last[i] = obs
            rewards[i] = float(reward)
            terminated[i], truncated[i] = bool(term), bool(trunc) and not bool(term)
            texts[i] = self.adapter.text(obs, info)
            success[i] = self.adapter.success(term, info)
            if term or trunc:
                self.running[i] = False
        return self.obs, rewards, terminated, truncated, texts, success

    def render(self, i: int) -> str:
        """A text picture of env `i`'s latest observation ("" when the env has none)."""
        if not 0 <= i < self.num_envs:
            raise BridgeError("INVALID_ARGUMENT", f"env index {i} is outside 0..{self.num_envs - 1}")
        return "" if self.last[i] is None else self.adapter.render(self.last[i])


def make_batch(env_id: str, num_envs: int, crop: int = 9, max_episode_steps: int = 0) -> Batch:
    return Batch(env_id, num_envs, crop=crop, max_episode_steps=max_episode_steps)
