"""A recurrent spur policy: a tanh MLP torso shared by both heads, then an LSTM or
GRU cell whose output feeds linear policy and value heads, like spur's built-in MLP
with `model.core = "lstm"` or `"gru"`. The state row holds the LSTM's hidden and
cell state side by side (2 * size floats), or the GRU's hidden state.

    python examples/models/recurrent_mlp.py --obs-dim 5 --actions 4 --core lstm \\
        --out runs/models/memory_lstm.pt
"""

import math
from typing import List, Tuple

import torch
from torch import Tensor, nn

from common import linear, load_spec, near_uniform, parser, save


class RecurrentMlpPolicy(nn.Module):
    def __init__(self, obs_dim: int, num_actions: int, hidden: List[int], core: str, size: int):
        super().__init__()
        sizes = [obs_dim] + hidden
        self.torso = nn.Sequential(
            *[m for i in range(len(hidden)) for m in (linear(sizes[i], sizes[i + 1]), nn.Tanh())]
        )
        self.lstm = core == "lstm"
        self.size = size
        # The cell's weights, initialized as PyTorch initializes its LSTM and GRU cells.
        gates = 4 if self.lstm else 3
        bound = 1.0 / math.sqrt(size)
        self.w_ih = nn.Parameter(torch.empty(gates * size, sizes[-1]).uniform_(-bound, bound))
        self.w_hh = nn.Parameter(torch.empty(gates * size, size).uniform_(-bound, bound))
        self.b_ih = nn.Parameter(torch.empty(gates * size).uniform_(-bound, bound))
        self.b_hh = nn.Parameter(torch.empty(gates * size).uniform_(-bound, bound))
        self.pi = linear(size, num_actions)
        self.v = linear(size, 1)
        near_uniform(self.pi)

    @torch.jit.export
    def initial_state(self, batch: int) -> Tensor:
        width = 2 * self.size if self.lstm else self.size
        return torch.zeros(batch, width)

    def forward(self, obs: Tensor, state: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        x = self.torso(obs)
        if self.lstm:
            hc = (state[:, : self.size], state[:, self.size :])
            h, c = torch.lstm_cell(x, hc, self.w_ih, self.w_hh, self.b_ih, self.b_hh)
            next_state = torch.cat([h, c], dim=1)
        else:
            h = torch.gru_cell(x, state, self.w_ih, self.w_hh, self.b_ih, self.b_hh)
            next_state = h
        return self.pi(h), self.v(h).squeeze(-1), next_state


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, nargs="+", default=[32])
    p.add_argument("--core", choices=["lstm", "gru"], default="lstm")
    p.add_argument("--size", type=int, default=32, help="width of the hidden state")
    args = p.parse_args()
    spec = load_spec(args)
    torch.manual_seed(args.seed)
    module = RecurrentMlpPolicy(
        spec["obs_dim"], spec["num_actions"], args.hidden, args.core, args.size
    )
    save(module, args.out)


if __name__ == "__main__":
    main()
