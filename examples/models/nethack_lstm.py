"""A NetHack/MiniHack spur policy with an LSTM core, shaped like spur's built-in
NetHack network with `model.core = "lstm"`: the glyph crop through an embedding and
two 3x3 convolutions, the bottom-line stats through a signed log and a linear layer,
the message bytes through an embedding and a strided 1-D convolution (max over
positions); the three joined by a core layer, then an LSTM cell feeding the policy
and value heads.

The observation is the bridge's flat layout; the module slices it at the offsets of
the `glyphs_crop`, `blstats` and `message` fields, read from the env spec:

    spur spec --config configs/minihack-room.toml > spec.json
    python examples/models/nethack_lstm.py --spec spec.json --out runs/models/nethack_lstm.pt
"""

import math
from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn

from common import linear, load_spec, near_uniform, parser, save

# NetHack's glyph ids run from 0 to MAX_GLYPH ("nothing", which pads the crop).
MAX_GLYPH = 5976


def field_offsets(spec: dict) -> Dict[str, Tuple[int, List[int]]]:
    """Offset and shape of every field of the flat observation, in layout order."""
    at, out = 0, {}
    for f in spec["fields"]:
        out[f["name"]] = (at, list(f["shape"]))
        at += math.prod(f["shape"])
    return out


class NetHackLstmPolicy(nn.Module):
    def __init__(self, spec: dict, core: int, size: int):
        super().__init__()
        fields = field_offsets(spec)
        missing = [n for n in ("glyphs_crop", "blstats", "message") if n not in fields]
        if missing:
            raise SystemExit(f"the env spec has no field(s) {missing}")
        self.crop_at, crop_shape = fields["glyphs_crop"]
        if len(crop_shape) != 2 or crop_shape[0] != crop_shape[1]:
            raise SystemExit(f"glyphs_crop must be square, not {crop_shape}")
        self.crop = crop_shape[0]
        self.stats_at, stats_shape = fields["blstats"]
        self.n_stats = math.prod(stats_shape)
        self.msg_at, msg_shape = fields["message"]
        self.n_msg = math.prod(msg_shape)
        self.max_glyph = MAX_GLYPH
        c = self.crop
        self.glyph_emb = nn.Embedding(MAX_GLYPH + 1, 16)
        self.conv1 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.crop_fc = linear(32 * c * c, 256)
        self.stats_fc = linear(self.n_stats, 64)
        self.msg_emb = nn.Embedding(256, 16)
        self.msg_conv = nn.Conv1d(16, 64, 8, stride=4)
        self.core = linear(256 + 64 + 64, core)
        self.size = size
        self.lstm = nn.LSTMCell(core, size)
        self.pi = linear(size, spec["num_actions"])
        self.v = linear(size, 1)
        near_uniform(self.pi)
        near_uniform(self.v)

    @torch.jit.export
    def initial_state(self, batch: int) -> Tensor:
        # The LSTM's hidden and cell state side by side.
        return torch.zeros(batch, 2 * self.size)

    def torso(self, obs: Tensor) -> Tensor:
        b, c = obs.shape[0], self.crop
        glyphs = obs[:, self.crop_at : self.crop_at + c * c].long().clamp(0, self.max_glyph)
        g = self.glyph_emb(glyphs.view(b, c, c)).permute(0, 3, 1, 2)
        g = nn.functional.elu(self.conv1(g))
        g = nn.functional.elu(self.conv2(g))
        g = nn.functional.elu(self.crop_fc(g.flatten(1)))
        stats = obs[:, self.stats_at : self.stats_at + self.n_stats]
        # Signed log: hit points, gold and turn counts span many orders of magnitude.
        s = nn.functional.elu(self.stats_fc(stats.sign() * stats.abs().log1p()))
        msg = obs[:, self.msg_at : self.msg_at + self.n_msg].long().clamp(0, 255)
        m = self.msg_emb(msg).permute(0, 2, 1)
        m = nn.functional.elu(self.msg_conv(m)).amax(-1)
        return nn.functional.elu(self.core(torch.cat([g, s, m], dim=1)))

    def forward(self, obs: Tensor, state: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        hc = (state[:, : self.size], state[:, self.size :])
        h, c = self.lstm(self.torso(obs), hc)
        return self.pi(h), self.v(h).squeeze(-1), torch.cat([h, c], dim=1)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--core", type=int, default=256, help="width of the core layer")
    p.add_argument("--size", type=int, default=128, help="width of the LSTM state")
    args = p.parse_args()
    spec = load_spec(args)
    torch.manual_seed(args.seed)
    save(NetHackLstmPolicy(spec, args.core, args.size), args.out)


if __name__ == "__main__":
    main()
