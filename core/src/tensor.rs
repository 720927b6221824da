//! The wire `Tensor` message: building one from a slice and reading one back with
//! every claim checked (dtype, shape, byte length, finite values).

use spur_proto::v1::{Dtype, Tensor};

use crate::error::WireError;

/// Element types that travel as `Tensor`s.
pub trait Element: bytemuck::Pod {
    const DTYPE: Dtype;
    const SIZE: usize;
    fn write_le(self, out: &mut Vec<u8>);
    fn read_le(bytes: &[u8]) -> Self;
    /// The index of the first value in the little-endian `bytes` that is not a
    /// finite number.
    fn first_non_finite(_bytes: &[u8]) -> Option<usize> {
        None
    }
}

/// Whether every little-endian f32 in `bytes` is finite. A value is infinite or NaN
/// exactly when its exponent bits are all set; the loop has no early exit, so it
/// vectorizes (a learner checks every chunk it takes, an actor every weight it loads).
pub fn all_finite_le(bytes: &[u8]) -> bool {
    const EXPONENT: u32 = 0x7f80_0000;
    !bytes.chunks_exact(4).fold(false, |bad, b| {
        let bits = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        bad | (bits & EXPONENT == EXPONENT)
    })
}

/// The exponent bits of an IEEE half (f16): all set means infinite or NaN.
pub const F16_EXPONENT: u16 = 0x7c00;
/// The exponent bits of a bfloat16: all set means infinite or NaN.
pub const BF16_EXPONENT: u16 = 0x7f80;

/// Whether every little-endian 16-bit float in `bytes` is finite, for a format whose
/// exponent bits are `exponent` ([`F16_EXPONENT`], [`BF16_EXPONENT`]); one pass with
/// no early exit, so it vectorizes.
pub fn all_finite_le16(bytes: &[u8], exponent: u16) -> bool {
    !bytes.chunks_exact(2).fold(false, |bad, b| {
        let bits = u16::from_le_bytes([b[0], b[1]]);
        bad | (bits & exponent == exponent)
    })
}

impl Element for f32 {
    const DTYPE: Dtype = Dtype::F32;
    const SIZE: usize = 4;
    fn write_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn read_le(b: &[u8]) -> Self {
        f32::from_le_bytes(b.try_into().expect("chunks_exact yields SIZE bytes"))
    }
    fn first_non_finite(bytes: &[u8]) -> Option<usize> {
        // The position is looked for only when there is one to report.
        if all_finite_le(bytes) {
            return None;
        }
        bytes
            .chunks_exact(4)
            .position(|b| !Self::read_le(b).is_finite())
    }
}

impl Element for i64 {
    const DTYPE: Dtype = Dtype::I64;
    const SIZE: usize = 8;
    fn write_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn read_le(b: &[u8]) -> Self {
        i64::from_le_bytes(b.try_into().expect("chunks_exact yields SIZE bytes"))
    }
}

impl Element for u8 {
    const DTYPE: Dtype = Dtype::U8;
    const SIZE: usize = 1;
    fn write_le(self, out: &mut Vec<u8>) {
        out.push(self);
    }
    fn read_le(b: &[u8]) -> Self {
        b[0]
    }
}

/// Packs `data` with `shape` into a wire tensor.
pub fn encode<T: Element>(shape: &[usize], data: &[T]) -> Tensor {
    debug_assert_eq!(shape.iter().product::<usize>(), data.len());
    let bytes = if cfg!(target_endian = "little") {
        // The values' own bytes are their wire form: one copy.
        bytemuck::cast_slice::<T, u8>(data).to_vec()
    } else {
        let mut bytes = Vec::with_capacity(data.len() * T::SIZE);
        for &x in data {
            x.write_le(&mut bytes);
        }
        bytes
    };
    Tensor {
        dtype: T::DTYPE as i32,
        shape: shape.iter().map(|&d| d as i64).collect(),
        data: bytes.into(),
    }
}

/// Reads a wire tensor whose shape must equal `shape`, rejecting wrong dtypes,
/// disagreeing lengths and non-finite floats.
pub fn decode<T: Element>(
    field: &'static str,
    tensor: Option<&Tensor>,
    shape: &[usize],
) -> Result<Vec<T>, WireError> {
    let t = tensor.ok_or(WireError::Missing { field })?;
    if t.dtype != T::DTYPE as i32 {
        let got = Dtype::try_from(t.dtype)
            .map(|d| d.as_str_name().to_string())
            .unwrap_or_else(|_| format!("unknown dtype {}", t.dtype));
        return Err(WireError::invalid(
            field,
            format!("dtype is {got}, expected {}", T::DTYPE.as_str_name()),
        ));
    }
    let want: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    if t.shape != want {
        return Err(WireError::invalid(
            field,
            format!("shape is {:?}, expected {:?}", t.shape, want),
        ));
    }
    let count: usize = shape.iter().product();
    if t.data.len() != count * T::SIZE {
        return Err(WireError::invalid(
            field,
            format!(
                "holds {} bytes, but shape {:?} of {} needs {}",
                t.data.len(),
                want,
                T::DTYPE.as_str_name(),
                count * T::SIZE
            ),
        ));
    }
    if let Some(i) = T::first_non_finite(&t.data) {
        return Err(WireError::invalid(
            field,
            format!("element {i} is not a finite number"),
        ));
    }
    Ok(if cfg!(target_endian = "little") {
        // One copy into place (the wire bytes need not be aligned for `T`).
        let mut out = vec![T::zeroed(); count];
        bytemuck::cast_slice_mut::<T, u8>(&mut out).copy_from_slice(&t.data);
        out
    } else {
        t.data.chunks_exact(T::SIZE).map(T::read_le).collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let t = encode(&[2, 3], &[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.5]);
        assert_eq!(
            decode::<f32>("x", Some(&t), &[2, 3]).unwrap(),
            vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.5]
        );
        let t = encode(&[2], &[-3i64, 9]);
        assert_eq!(decode::<i64>("x", Some(&t), &[2]).unwrap(), vec![-3, 9]);
    }

    #[test]
    fn rejects_lies() {
        let good = encode(&[2, 2], &[1.0f32; 4]);
        assert!(matches!(
            decode::<f32>("obs", None, &[2, 2]),
            Err(WireError::Missing { field: "obs" })
        ));
        assert!(decode::<f32>("obs", Some(&good), &[4])
            .unwrap_err()
            .to_string()
            .contains("shape"));
        assert!(decode::<i64>("obs", Some(&good), &[2, 2])
            .unwrap_err()
            .to_string()
            .contains("dtype"));
        let mut short = good.clone();
        short.data.truncate(15);
        assert!(decode::<f32>("obs", Some(&short), &[2, 2])
            .unwrap_err()
            .to_string()
            .contains("bytes"));
        let nan = encode(&[2], &[1.0f32, f32::NAN]);
        assert!(decode::<f32>("obs", Some(&nan), &[2])
            .unwrap_err()
            .to_string()
            .contains("finite"));
    }

    #[test]
    fn sixteen_bit_floats_are_finite_unless_their_exponent_is_all_ones() {
        let le = |v: &[u16]| v.iter().flat_map(|b| b.to_le_bytes()).collect::<Vec<u8>>();
        // f16: the largest finite (65504), the smallest subnormal, -0 and 1.0.
        let finite = [0x7bffu16, 0x0001, 0x8000, 0x3c00];
        assert!(all_finite_le16(&le(&finite), F16_EXPONENT));
        for bad in [0x7c00u16, 0xfc00, 0x7e00, 0x7c01] {
            let mut v = finite.to_vec();
            v.insert(2, bad);
            assert!(!all_finite_le16(&le(&v), F16_EXPONENT), "{bad:#x}");
        }
        // bf16: the largest finite (about 3.4e38), -0 and 1.0; 0x7c00 is a finite
        // bf16 (3.0e36) though an infinite f16.
        let finite = [0x7f7fu16, 0x8000, 0x3f80, 0x7c00];
        assert!(all_finite_le16(&le(&finite), BF16_EXPONENT));
        for bad in [0x7f80u16, 0xff80, 0x7fc0, 0x7f81] {
            let mut v = finite.to_vec();
            v.push(bad);
            assert!(!all_finite_le16(&le(&v), BF16_EXPONENT), "{bad:#x}");
        }
    }

    /// Values are read from wherever the message put them (not aligned for the
    /// type), and the first non-finite one is named.
    #[test]
    fn reads_unaligned_bytes_and_names_the_first_bad_value() {
        let values: Vec<f32> = (0..37).map(|i| i as f32 * 0.5 - 3.0).collect();
        let mut t = encode(&[37], &values);
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&t.data);
        t.data = spur_proto::Bytes::from(shifted).slice(1..);
        assert_eq!(decode::<f32>("obs", Some(&t), &[37]).unwrap(), values);
        let ids = encode(&[3], &[-1i64, i64::MAX, 7]);
        assert_eq!(
            decode::<i64>("ids", Some(&ids), &[3]).unwrap(),
            vec![-1, i64::MAX, 7]
        );
        let mut bad = values.clone();
        bad[30] = f32::NEG_INFINITY;
        bad[33] = f32::NAN;
        let err = decode::<f32>("obs", Some(&encode(&[37], &bad)), &[37])
            .unwrap_err()
            .to_string();
        assert!(err.contains("obs") && err.contains("element 30"), "{err}");
    }
}
