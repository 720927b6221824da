"""A feedforward spur policy: separate policy and value MLPs with tanh activations,
like spur's built-in `model.arch = "mlp"` (hidden `[64, 64]` by default, a small
last policy layer).

    python examples/models/mlp.py --obs-dim 4 --actions 2 --out runs/models/mlp.pt
"""

from typing import List, Tuple

import torch
from torch import Tensor, nn

from common import linear, load_spec, near_uniform, parser, save


def tanh_mlp(sizes: List[int]) -> nn.Sequential:
    layers: List[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class MlpPolicy(nn.Module):
    def __init__(self, obs_dim: int, num_actions: int, hidden: List[int]):
        super().__init__()
        self.policy = tanh_mlp([obs_dim] + hidden + [num_actions])
        self.value = tanh_mlp([obs_dim] + hidden + [1])
        near_uniform(self.policy[-1])

    @torch.jit.export
    def initial_state(self, batch: int) -> Tensor:
        # Feedforward: no state, a [batch, 0] tensor.
        return torch.zeros(batch, 0)

    def forward(self, obs: Tensor, state: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        return self.policy(obs), self.value(obs).squeeze(-1), state


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 64])
    args = p.parse_args()
    spec = load_spec(args)
    torch.manual_seed(args.seed)
    save(MlpPolicy(spec["obs_dim"], spec["num_actions"], args.hidden), args.out)


if __name__ == "__main__":
    main()
