//! Element types the communicators move, and the deterministic host reduction they share.

use std::fmt;

use half::{bf16, f16};

/// How a reducing collective combines the ranks' values, element by element.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    /// The sum over ranks.
    Sum,
    /// The sum over ranks divided by the world size.
    Avg,
    /// The maximum over ranks. On the host a NaN on any rank gives NaN (so an overflow check
    /// through `Max` cannot miss a NaN); NCCL's `ncclMax` is used on the device.
    Max,
}

impl ReduceOp {
    /// Lower-case name used in messages.
    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Avg => "avg",
            ReduceOp::Max => "max",
        }
    }
}

impl fmt::Display for ReduceOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An element type every communicator can move and reduce: `f32`, `f64`, `half::f16`,
/// `half::bf16`, and `u32` for flags and counters.
///
/// The bounds on cudarc's `NcclType` and `DeviceRepr` let the same type flow through the NCCL
/// communicator; the host reduction is [`CommElement::reduce`].
pub trait CommElement:
    Copy
    + Default
    + PartialEq
    + fmt::Debug
    + Send
    + Sync
    + 'static
    + cudarc::nccl::NcclType
    + cudarc::driver::DeviceRepr
{
    /// The dtype's name in messages ("f32").
    const DTYPE: &'static str;

    /// Reduces `inputs` element by element into `out`, folding the inputs in slice order
    /// (rank 0, 1, ..., N-1): `out[i] = ((in0[i] op in1[i]) op in2[i]) ...`.
    ///
    /// Contract: every input has exactly `out.len()` elements; `inputs` is not empty (with no
    /// inputs `out` is left as it is). `Avg` divides the sum by `inputs.len()` once at the end.
    /// `f16`/`bf16` accumulate in `f32` and round once, so N-rank averages of half gradients do
    /// not lose bits to N-1 intermediate roundings. The order never depends on timing, which is
    /// what makes [`crate::comm::LocalGroup`] bitwise reproducible.
    fn reduce(inputs: &[&[Self]], op: ReduceOp, out: &mut [Self]);
}

/// Maximum that propagates NaN from either side.
#[inline]
fn nan_max_f32(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else {
        a.max(b)
    }
}

#[inline]
fn nan_max_f64(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

macro_rules! native_float_element {
    ($t:ty, $name:literal, $max:ident) => {
        impl CommElement for $t {
            const DTYPE: &'static str = $name;

            fn reduce(inputs: &[&[Self]], op: ReduceOp, out: &mut [Self]) {
                let Some((first, rest)) = inputs.split_first() else {
                    return;
                };
                out.copy_from_slice(first);
                match op {
                    ReduceOp::Sum | ReduceOp::Avg => {
                        for input in rest {
                            for (o, &x) in out.iter_mut().zip(input.iter()) {
                                *o += x;
                            }
                        }
                    }
                    ReduceOp::Max => {
                        for input in rest {
                            for (o, &x) in out.iter_mut().zip(input.iter()) {
                                *o = $max(*o, x);
                            }
                        }
                    }
                }
                if op == ReduceOp::Avg {
                    let n = inputs.len() as $t;
                    for o in out.iter_mut() {
                        *o /= n;
                    }
                }
            }
        }
    };
}

native_float_element!(f32, "f32", nan_max_f32);
native_float_element!(f64, "f64", nan_max_f64);

/// `u32` words (flags and counters, e.g. a device step state's non-finite flag): `Sum` wraps,
/// `Avg` is the wrapping sum divided by the number of ranks, rounded down, `Max` the largest.
impl CommElement for u32 {
    const DTYPE: &'static str = "u32";

    fn reduce(inputs: &[&[Self]], op: ReduceOp, out: &mut [Self]) {
        let Some((first, rest)) = inputs.split_first() else {
            return;
        };
        out.copy_from_slice(first);
        for input in rest {
            for (o, &x) in out.iter_mut().zip(input.iter()) {
                *o = match op {
                    ReduceOp::Sum | ReduceOp::Avg => o.wrapping_add(x),
                    ReduceOp::Max => (*o).max(x),
                };
            }
        }
        if op == ReduceOp::Avg {
            let n = inputs.len() as u32;
            for o in out.iter_mut() {
                *o /= n;
            }
        }
    }
}

/// Elements of a half type reduced per block through an `f32` accumulator on the stack.
const HALF_BLOCK: usize = 256;

macro_rules! half_float_element {
    ($t:ty, $name:literal) => {
        impl CommElement for $t {
            const DTYPE: &'static str = $name;

            fn reduce(inputs: &[&[Self]], op: ReduceOp, out: &mut [Self]) {
                let Some((first, rest)) = inputs.split_first() else {
                    return;
                };
                let n = inputs.len() as f32;
                let mut acc = [0.0f32; HALF_BLOCK];
                for (block, out_block) in out.chunks_mut(HALF_BLOCK).enumerate() {
                    let base = block * HALF_BLOCK;
                    let len = out_block.len();
                    let acc = &mut acc[..len];
                    for (a, x) in acc.iter_mut().zip(&first[base..base + len]) {
                        *a = x.to_f32();
                    }
                    for input in rest {
                        let xs = &input[base..base + len];
                        match op {
                            ReduceOp::Sum | ReduceOp::Avg => {
                                for (a, x) in acc.iter_mut().zip(xs) {
                                    *a += x.to_f32();
                                }
                            }
                            ReduceOp::Max => {
                                for (a, x) in acc.iter_mut().zip(xs) {
                                    *a = nan_max_f32(*a, x.to_f32());
                                }
                            }
                        }
                    }
                    if op == ReduceOp::Avg {
                        for a in acc.iter_mut() {
                            *a /= n;
                        }
                    }
                    for (o, a) in out_block.iter_mut().zip(acc.iter()) {
                        *o = <$t>::from_f32(*a);
                    }
                }
            }
        }
    };
}

half_float_element!(f16, "f16");
half_float_element!(bf16, "bf16");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum_folds_in_rank_order() {
        // 1e8 + 1 - 1e8 in f32 is 0 when folded left to right, 1 in other orders.
        let a = [1.0e8f32];
        let b = [1.0f32];
        let c = [-1.0e8f32];
        let mut out = [f32::NAN];
        f32::reduce(&[&a, &b, &c], ReduceOp::Sum, &mut out);
        assert_eq!(out[0], (1.0e8f32 + 1.0) - 1.0e8);
    }

    #[test]
    fn max_propagates_nan_and_avg_divides_once() {
        let mut out = [0.0f32; 2];
        f32::reduce(&[&[1.0, 2.0], &[f32::NAN, 5.0]], ReduceOp::Max, &mut out);
        assert!(out[0].is_nan());
        assert_eq!(out[1], 5.0);
        f32::reduce(
            &[&[1.0, 2.0], &[2.0, 5.0], &[3.0, 2.0]],
            ReduceOp::Avg,
            &mut out,
        );
        assert_eq!(out, [2.0, 3.0]);
    }

    #[test]
    fn u32_words_sum_and_max() {
        let mut out = [0u32; 2];
        u32::reduce(&[&[0, 7], &[1, 2], &[0, 9]], ReduceOp::Max, &mut out);
        assert_eq!(out, [1, 9]);
        u32::reduce(&[&[0, 7], &[1, 2], &[0, 9]], ReduceOp::Sum, &mut out);
        assert_eq!(out, [1, 18]);
    }

    #[test]
    fn half_types_accumulate_in_f32() {
        // 256 + 1 + 1 is 258 in f32 but 256 when every partial sum rounds to bf16 (8 bits).
        let xs = [bf16::from_f32(256.0); 300];
        let ones = [bf16::from_f32(1.0); 300];
        let mut out = [bf16::ZERO; 300];
        bf16::reduce(&[&xs, &ones, &ones], ReduceOp::Sum, &mut out);
        assert!(out.iter().all(|&o| o == bf16::from_f32(258.0)));
        let hs = [f16::from_f32(0.5); 3];
        let mut out = [f16::ZERO; 3];
        f16::reduce(&[&hs, &hs], ReduceOp::Avg, &mut out);
        assert_eq!(out, [f16::from_f32(0.5); 3]);
    }
}
