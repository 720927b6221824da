//! The NetHack network's forward pass for acting, through tensors folded from one
//! version of its weights. An actor runs the network on a few rows at a time (8 per
//! half with split envs), where the fixed cost of each libtorch call dominates:
//! oneDNN's convolutions cost about as much for 8 rows as for 16, MKL repacks a
//! transposed weight before every product, and the unfolded pass makes some seventy
//! calls. Folded:
//!
//! - the glyph embedding into the first convolution, which is linear in it: a table
//!   of what each glyph adds at each of the nine taps (and a ninth of the bias),
//!   summed over a pixel's window by one `embedding_bag`;
//! - the message embedding into the message convolution, the same way (eight taps);
//! - the second convolution into one matrix product over each output pixel's
//!   gathered 3x3 window (its weight reshaped once), so that the crop stays
//!   channels-last and `crop_fc`'s weight is reordered once to read it that way;
//! - the weights of `crop_fc`, `stats_fc` and `core`, transposed once into contiguous
//!   `[in, out]` copies.
//!
//! The bag indices, the signed log of the stats and the message's length are
//! computed in Rust from the observation rows, in one pass, instead of by a dozen
//! small tensor calls. The outputs equal the network's to float rounding. No
//! gradient reaches the weights through the tables, and they hold the weights of one
//! instant: only actors use them, recomputed whenever weights are loaded.

use tch::{Kind, Tensor};

use super::{message_cut, NetHackNet, MAX_GLYPH, MSG_KERNEL, MSG_STRIDE};

/// Taps of the 3x3 first convolution.
const TAPS: i64 = 9;

pub(super) struct Folded {
    /// `[(MAX_GLYPH + 2) * 9, conv1 channels]`: row `(g + 1) * 9 + k` is what glyph
    /// `g` adds to an output pixel through tap `k` (row-major in the 3x3 window),
    /// plus a ninth of the bias; rows 0..9 stand for the padding around the crop
    /// (the bias's ninth only).
    glyph_taps: Tensor,
    /// `[256 * MSG_KERNEL, message filters]`: row `byte * MSG_KERNEL + k` is what
    /// `byte` adds to a window's filters at offset `k`, plus an eighth of the bias.
    byte_taps: Tensor,
    /// The second convolution's weight as one product's: `[9 * in, out]`, row
    /// `k * in + i` what input channel `i` adds through tap `k`.
    conv2_t: Tensor,
    /// One row of zeros: the padding the second convolution reads around the crop.
    zero_row: Tensor,
    /// `crop_fc`'s weight, `[in, out]`, its rows in pixel-major order (`p * channels
    /// + i`, the order the second convolution's product leaves), contiguous.
    crop_fc_t: Tensor,
    /// `stats_fc`'s and `core`'s weights, `[in, out]`, contiguous.
    stats_fc_t: Tensor,
    core_t: Tensor,
    /// [`windows`] of the crop, collected once: each call extends its bag indices
    /// from a slice, which compiles to a tight loop, instead of from nested adapters.
    crop_windows: Vec<(i64, Option<i64>)>,
}

impl Folded {
    /// The tables for `net`'s weights as they are now.
    pub(super) fn new(net: &NetHackNet) -> Self {
        tch::no_grad(|| Folded {
            glyph_taps: taps_table(
                &net.glyph_emb.ws,
                &net.conv1.ws.flatten(2, -1),
                net.conv1.bs.as_ref(),
                1,
            ),
            byte_taps: taps_table(
                &net.msg_emb.ws,
                &net.msg_conv.ws,
                net.msg_conv.bs.as_ref(),
                0,
            ),
            conv2_t: {
                let w = &net.conv2.ws; // [out, in, 3, 3]
                let (out, inp) = (w.size()[0], w.size()[1]);
                w.permute([2, 3, 1, 0])
                    .reshape([TAPS * inp, out])
                    .contiguous()
            },
            zero_row: Tensor::zeros(
                [1, net.conv2.ws.size()[1]],
                (Kind::Float, net.conv2.ws.device()),
            ),
            crop_fc_t: {
                let w = &net.crop_fc.ws; // [out, channels * c * c], channel-major
                let (out, channels) = (w.size()[0], net.conv2.ws.size()[0]);
                w.view([out, channels, net.crop * net.crop])
                    .permute([2, 1, 0])
                    .reshape([-1, out])
                    .contiguous()
            },
            stats_fc_t: net.stats_fc.ws.tr().contiguous(),
            core_t: net.core.ws.tr().contiguous(),
            crop_windows: windows(net.crop).collect(),
        })
    }

    /// The core layer's output (`[B, core]`) for `obs`, `B` rows of `obs_dim` floats.
    pub(super) fn torso(&self, net: &NetHackNet, obs: &[f32], obs_dim: usize) -> Tensor {
        let rows: Vec<&[f32]> = obs.chunks_exact(obs_dim).collect();
        let b = rows.len() as i64;
        let device = self.glyph_taps.device();
        let c = net.crop;

        // The first convolution: nine table rows summed per output pixel.
        let mut index = Vec::with_capacity((b * c * c * TAPS) as usize);
        for row in &rows {
            let glyphs = field(row, net.crop_at, c * c);
            index.extend(self.crop_windows.iter().map(|&(k, pixel)| {
                let cell = pixel.map_or(0, |p| (glyphs[p as usize] as i64).clamp(0, MAX_GLYPH) + 1);
                cell * TAPS + k
            }));
        }
        let h = bag_sums(&self.glyph_taps, index, TAPS, device).elu(); // [b * c * c, ch]

        // The second convolution as one product: each output pixel's 3x3 window of
        // the first one's outputs (zeros outside the crop, row 0 of `padded`) in a
        // row of its own. At a few rows this costs less than oneDNN's convolution,
        // whose set-up is paid per call.
        let padded = Tensor::cat(&[&self.zero_row, &h], 0);
        let mut taps = Vec::with_capacity((b * c * c * TAPS) as usize);
        for r in 0..b {
            let first = 1 + r * c * c;
            taps.extend(
                self.crop_windows
                    .iter()
                    .map(|&(_, p)| p.map_or(0, |p| first + p)),
            );
        }
        let taps = Tensor::from_slice(&taps).to_device(device);
        let g = padded.index_select(0, &taps).view([b * c * c, -1]);
        let g = linear_t(&g, &self.conv2_t, net.conv2.bs.as_ref())
            .elu()
            .view([b, -1]);
        let g = linear_t(&g, &self.crop_fc_t, net.crop_fc.bs.as_ref()).elu();

        // Stats: the signed log, then their layer.
        let stats: Vec<f32> = rows
            .iter()
            .flat_map(|row| field(row, net.stats_at, net.n_stats))
            .map(|s| s.signum() * s.abs().ln_1p())
            .collect();
        let stats = Tensor::from_slice(&stats)
            .view([b, net.n_stats])
            .to_device(device);
        let stats = linear_t(&stats, &self.stats_fc_t, net.stats_fc.bs.as_ref()).elu();

        // The message: its windows up to the first all-zero one (see
        // `NetHackNet::message`), eight table rows summed per window.
        let byte = |x: f32| (x as i64).clamp(0, 255);
        let messages: Vec<&[f32]> = rows
            .iter()
            .map(|row| field(row, net.msg_at, net.n_msg))
            .collect();
        let end = messages
            .iter()
            .filter_map(|m| m.iter().rposition(|&x| byte(x) != 0))
            .max()
            .map_or(0, |last| last as i64 + 1);
        let windows = (message_cut(net.n_msg, end) - MSG_KERNEL) / MSG_STRIDE + 1;
        let mut index = Vec::with_capacity((b * windows * MSG_KERNEL) as usize);
        for m in &messages {
            for w in 0..windows {
                for k in 0..MSG_KERNEL {
                    index.push(byte(m[(w * MSG_STRIDE + k) as usize]) * MSG_KERNEL + k);
                }
            }
        }
        let m = bag_sums(&self.byte_taps, index, MSG_KERNEL, device)
            .view([b, windows, -1])
            .amax(1, false)
            .elu();

        let joined = Tensor::cat(&[g, stats, m], 1);
        linear_t(&joined, &self.core_t, net.core.bs.as_ref()).elu()
    }
}

/// The 3x3 windows of a `c` x `c` image with one pixel of padding, output pixel by
/// output pixel in row-major order: each tap's number (row-major in the window) and
/// the pixel it reads (`y * c + x`), `None` in the padding.
fn windows(c: i64) -> impl Iterator<Item = (i64, Option<i64>)> {
    (0..c * c).flat_map(move |p| {
        let (py, px) = (p / c, p % c);
        (0..TAPS).map(move |k| {
            let (y, x) = (py + k / 3 - 1, px + k % 3 - 1);
            let inside = (0..c).contains(&y) && (0..c).contains(&x);
            (k, inside.then_some(y * c + x))
        })
    })
}

/// `len` floats of `row` from `at`.
fn field(row: &[f32], at: i64, len: i64) -> &[f32] {
    &row[at as usize..(at + len) as usize]
}

/// `emb` `[V, E]` times each tap of `filters` `[O, E, K]`, plus `bias / K` on every
/// row: `[(V + pad_rows) * K, O]`, row `(v + pad_rows) * K + k` what value `v` adds
/// through tap `k`, after `pad_rows` blocks that add the bias's share alone.
fn taps_table(emb: &Tensor, filters: &Tensor, bias: Option<&Tensor>, pad_rows: i64) -> Tensor {
    let (e, k, out) = (filters.size()[1], filters.size()[2], filters.size()[0]);
    let table = emb.mm(&filters.permute([1, 2, 0]).reshape([e, k * out]));
    let pad = Tensor::zeros([pad_rows, k * out], (Kind::Float, table.device()));
    let rows = Tensor::cat(&[pad, table], 0).view([-1, out]);
    match bias {
        // Every sum takes exactly K rows, so each carries a K-th of the bias.
        Some(b) => rows + b / k as f64,
        None => rows,
    }
}

/// Sums of `table`'s rows over each run of `per` consecutive entries of `index`:
/// `[index.len() / per, O]` on `device`.
fn bag_sums(table: &Tensor, index: Vec<i64>, per: i64, device: tch::Device) -> Tensor {
    let n = index.len() as i64;
    let index = Tensor::from_slice(&index).to_device(device);
    let offsets = Tensor::arange_start_step(0, n, per, (Kind::Int64, device));
    // Mode 0: sum.
    let (sums, _, _, _) =
        Tensor::embedding_bag::<Tensor>(table, &index, &offsets, false, 0, false, None, false);
    sums
}

/// `x` `[B, in]` times `weight_t` `[in, out]`, plus `bias`.
fn linear_t(x: &Tensor, weight_t: &Tensor, bias: Option<&Tensor>) -> Tensor {
    match bias {
        Some(b) => b.addmm(x, weight_t),
        None => x.mm(weight_t),
    }
}
