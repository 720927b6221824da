//! The NetHack network's forward pass for acting, through tensors folded from one
//! version of its weights. An actor runs the network on a few rows at a time (8 per
//! half with split envs), where fixed costs per operation dominate: oneDNN's
//! convolutions cost about as much for 8 rows as for 16, and MKL repacks the
//! transposed 2592x256 weight of `crop_fc` before every product. Folded:
//!
//! - the glyph embedding into the first convolution, which is linear in it: a table
//!   of what each glyph adds at each of the nine taps, summed over a pixel's window
//!   by one `embedding_bag`;
//! - the message embedding into the message convolution, the same way (eight taps);
//! - `crop_fc`'s weight, transposed once into a contiguous `[in, out]` copy.
//!
//! The outputs equal the network's to float rounding. No gradient reaches the
//! weights through the tables, and they are computed from the weights at one
//! instant: only actors use them, refreshed whenever weights are loaded.

use tch::{Kind, Tensor};

use super::{NetHackNet, MSG_KERNEL, MSG_STRIDE};

/// Taps of the 3x3 first convolution.
const TAPS: i64 = 9;

pub(super) struct Folded {
    /// `[(MAX_GLYPH + 2) * 9, conv1 channels]`: row `(g + 1) * 9 + k` is what glyph
    /// `g` adds to an output pixel through tap `k` (row-major in the 3x3 window);
    /// rows 0..9 are zeros, the padding around the crop.
    glyph_taps: Tensor,
    /// `[crop * crop * 9]`: for each output pixel and tap, the cell of the crop padded
    /// by one on every side (`(crop + 2)^2` cells, row-major) that the tap reads.
    tap_cells: Tensor,
    /// `[crop * crop * 9]`: the tap number of each entry of `tap_cells`.
    tap_ids: Tensor,
    /// `[256 * MSG_KERNEL, message filters]`: row `byte * MSG_KERNEL + k` is what
    /// `byte` adds to a window's filters at offset `k`.
    byte_taps: Tensor,
    /// `[MSG_KERNEL]`: 0, 1, ... MSG_KERNEL - 1.
    byte_tap_ids: Tensor,
    /// `[32 * crop * crop, 256]`: `crop_fc`'s weight transposed, contiguous.
    crop_fc_t: Tensor,
}

impl Folded {
    /// The tables for `net`'s weights as they are now.
    pub(super) fn new(net: &NetHackNet) -> Self {
        tch::no_grad(|| {
            let device = net.glyph_emb.ws.device();
            let glyph_taps = taps_table(&net.glyph_emb.ws, &net.conv1.ws.flatten(2, -1), 1);
            let byte_taps = taps_table(&net.msg_emb.ws, &net.msg_conv.ws, 0);
            let c = net.crop;
            let mut cells = Vec::with_capacity((c * c * TAPS) as usize);
            for (y, x) in (0..c).flat_map(|y| (0..c).map(move |x| (y, x))) {
                for (dy, dx) in (0..3).flat_map(|dy| (0..3).map(move |dx| (dy, dx))) {
                    cells.push((y + dy) * (c + 2) + x + dx);
                }
            }
            let taps = Tensor::arange(TAPS, (Kind::Int64, device));
            Folded {
                glyph_taps,
                tap_cells: Tensor::from_slice(&cells).to_device(device),
                tap_ids: taps.repeat([c * c]),
                byte_taps,
                byte_tap_ids: Tensor::arange(MSG_KERNEL, (Kind::Int64, device)),
                crop_fc_t: net.crop_fc.ws.tr().contiguous(),
            }
        })
    }

    /// The first convolution of the embedded `glyphs` (`[B, crop, crop]` ids in
    /// 0..=MAX_GLYPH), channels-last as the unfolded pass leaves it: `[B, C, crop, crop]`.
    pub(super) fn first_conv(&self, net: &NetHackNet, glyphs: &Tensor) -> Tensor {
        let (b, c) = (glyphs.size()[0], net.crop);
        // Each cell's first table row, with 0 (zeros) for the padding.
        let rows = ((glyphs + 1) * TAPS)
            .constant_pad_nd([1, 1, 1, 1])
            .view([b, (c + 2) * (c + 2)]);
        let index = rows.index_select(1, &self.tap_cells) + &self.tap_ids;
        let sums = bag_sums(&self.glyph_taps, &index, TAPS);
        add_bias(sums, net.conv1.bs.as_ref())
            .view([b, c, c, -1])
            .permute([0, 3, 1, 2])
    }

    /// The message convolution's best response per filter over the windows of
    /// `bytes` (`[B, L]`, 0..=255), before the activation: `[B, filters]`.
    pub(super) fn message_max(&self, net: &NetHackNet, bytes: &Tensor) -> Tensor {
        let b = bytes.size()[0];
        let index = bytes.unfold(1, MSG_KERNEL, MSG_STRIDE) * MSG_KERNEL + &self.byte_tap_ids;
        let windows = index.size()[1];
        let sums = bag_sums(&self.byte_taps, &index, MSG_KERNEL);
        // The bias is the same in every window: added after the maximum.
        add_bias(
            sums.view([b, windows, -1]).amax(1, false),
            net.msg_conv.bs.as_ref(),
        )
    }

    /// `crop_fc` on the flattened convolution features.
    pub(super) fn crop_fc(&self, net: &NetHackNet, x: &Tensor) -> Tensor {
        match &net.crop_fc.bs {
            Some(bias) => bias.addmm(x, &self.crop_fc_t),
            None => x.mm(&self.crop_fc_t),
        }
    }
}

/// `emb` `[V, E]` times each tap of `filters` `[O, E, K]`: `[(V + pad_rows) * K, O]`,
/// row `(v + pad_rows) * K + k` what value `v` adds through tap `k`, after
/// `pad_rows` blocks of zeros.
fn taps_table(emb: &Tensor, filters: &Tensor, pad_rows: i64) -> Tensor {
    let (e, k, out) = (filters.size()[1], filters.size()[2], filters.size()[0]);
    let table = emb.mm(&filters.permute([1, 2, 0]).reshape([e, k * out]));
    let pad = Tensor::zeros([pad_rows, k * out], (Kind::Float, table.device()));
    Tensor::cat(&[pad, table], 0).view([-1, out])
}

/// Sums of `table`'s rows over each run of `per` consecutive entries of `index`
/// (any shape; its elements in row-major order): `[index.numel() / per, O]`.
fn bag_sums(table: &Tensor, index: &Tensor, per: i64) -> Tensor {
    let flat = index.reshape([-1]);
    let offsets = Tensor::arange_start_step(0, flat.size()[0], per, (Kind::Int64, flat.device()));
    // Mode 0: sum.
    let (sums, _, _, _) =
        Tensor::embedding_bag::<Tensor>(table, &flat, &offsets, false, 0, false, None, false);
    sums
}

fn add_bias(x: Tensor, bias: Option<&Tensor>) -> Tensor {
    match bias {
        Some(b) => x + b,
        None => x,
    }
}
