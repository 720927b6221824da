"""Helpers the example policies share: spur's layer initialization, the env spec
(`spur spec --config X` prints it as JSON) and saving a scripted module."""

import argparse
import json
import math
from pathlib import Path

import torch
from torch import nn


def linear(fan_in: int, fan_out: int) -> nn.Linear:
    """A linear layer initialized as spur's built-in networks initialize theirs:
    Kaiming-uniform weights for ReLU gain, biases uniform in +-1/sqrt(fan_in)."""
    layer = nn.Linear(fan_in, fan_out)
    nn.init.kaiming_uniform_(layer.weight, nonlinearity="relu")
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(layer.bias, -bound, bound)
    return layer


def near_uniform(layer: nn.Linear) -> None:
    """Shrinks a head's last layer so a fresh policy explores evenly."""
    with torch.no_grad():
        layer.weight.mul_(0.01)
        layer.bias.zero_()


def load_spec(args: argparse.Namespace) -> dict:
    """The env spec: the JSON file of `--spec`, else `--obs-dim` and `--actions`."""
    if args.spec:
        return json.loads(Path(args.spec).read_text())
    if args.obs_dim is None or args.actions is None:
        raise SystemExit("give --spec FILE, or both --obs-dim and --actions")
    return {"obs_dim": args.obs_dim, "num_actions": args.actions, "fields": []}


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--spec", help="env spec JSON, as `spur spec --config X` prints it")
    p.add_argument("--obs-dim", type=int, help="observation length (without --spec)")
    p.add_argument("--actions", type=int, help="number of actions (without --spec)")
    p.add_argument("--out", required=True, help="where to write the TorchScript file")
    p.add_argument("--seed", type=int, default=0)
    return p


def save(module: nn.Module, out: str) -> None:
    """Scripts `module` and writes it to `out` (parent folders created)."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(module), out)
    print(f"wrote {out}")
