//! Fused AdamW over one flat fp32 parameter buffer (llm.c style), one launch per step.
//!
//! Per element `i` (global index `gi = offset + i`), all f32 operations rounded to nearest,
//! no fused multiply-add (the same operations, in the same order, as Lathe's CPU optimizer):
//!
//! ```text
//! t   = state[STEP] + 1                                  // applied steps, this one included
//! gs  = (unscale ? state[INV_SCALE] : 1) * state[CLIP]
//! g   = grad * gs
//! m   = beta1 * m + (1 - beta1) * g
//! v   = beta2 * v + (1 - beta2) * (g * g)
//! u   = (m / bc1) / (sqrt(v / bc2) + eps)                // bc = f32(1 - beta^t), beta^t in f64
//! u   = u + wd * p                                       // only where gi is in a decay range
//! p   = p - lr * u                                       // fp32 master
//! w   = round(p)                                         // bf16 / f16 working copy (optional)
//! ```
//!
//! When `state[FOUND_INF]` is set the kernel returns before touching anything: the skip is
//! decided on the device, with no host synchronisation. The step counter, loss scale and clip
//! factor all come from the step state (see [`super::amp`]); `lr` and the betas are launch
//! parameters (the schedule is known on the host without reading the device).
//!
//! Weight decay design: a table of decay ranges (sorted, disjoint, non-adjacent half-open
//! ranges of global indices, [`DecayRanges`]) keeps a single flat launch, costs no bytes per
//! element (a per-element u8 mask would add 1 B to 30 B per element, 3%), and is exactly what
//! a parameter layout knows (its views with `decay = true`, merged). The kernel walks it with
//! a per-thread cursor (see `adamw_ptx`).
//!
//! Stochastic rounding (bf16 only) uses a counter-based hash of `(seed, t, gi)`, reproducible
//! and independent of the launch shape: see [`twin::stochastic_key`].
//!
//! Variants: `lathe_adamw_f32` (no working copy), `lathe_adamw_f32_bf16`,
//! `lathe_adamw_f32_bf16_sr` (stochastic rounding), `lathe_adamw_f32_f16`.

use super::adamw_ptx;
use crate::desc::{Arg, ArgKind, Cost, Elem, Geometry, KernelDesc, Module, Problem, Target, arg};
use std::borrow::Cow;
use std::ops::Range;

/// Threads per block.
pub const THREADS: u32 = 256;
/// Blocks are capped here; the grid-stride loop covers the rest. High enough that the last,
/// partial wave of blocks is a small share of the launch (at 124.5M parameters: about 25
/// waves of 5 resident blocks per SM on an H100, each thread taking about 7.4 groups).
pub const MAX_BLOCKS: u64 = 16384;

/// Which working copy the kernel writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Working {
    None,
    /// bf16, round to nearest even.
    Bf16,
    /// bf16, stochastic rounding.
    Bf16Stochastic,
    /// IEEE half, round to nearest even.
    F16,
}

fn module_ptx() -> Cow<'static, str> {
    let mut s = crate::ptx::header(Target::Sm80);
    for d in ALL {
        s.push_str(&adamw_ptx::kernel(d.entry, working_of(d.entry)));
    }
    Cow::Owned(s)
}

fn working_of(entry: &str) -> Working {
    match entry {
        "lathe_adamw_f32_bf16" => Working::Bf16,
        "lathe_adamw_f32_bf16_sr" => Working::Bf16Stochastic,
        "lathe_adamw_f32_f16" => Working::F16,
        _ => Working::None,
    }
}

/// The module of this family.
pub static MODULE: Module = Module {
    name: "nn_adamw",
    target: Target::Sm80,
    ptx: module_ptx,
};

/// Launch shape for `Problem::elems(n)`.
pub fn geometry(p: &Problem) -> Geometry {
    let blocks =
        p.n.div_ceil(4)
            .div_ceil(THREADS as u64)
            .clamp(1, MAX_BLOCKS);
    Geometry {
        grid: (blocks as u32, 1, 1),
        block: (THREADS, 1, 1),
        shared_bytes: 0,
    }
}

fn cost(p: &Problem, working_bytes: u64) -> Cost {
    Cost {
        flops: 20 * p.n,
        // read p, g, m, v; write p, m, v; write the working copy.
        bytes: p.n * (28 + working_bytes),
    }
}

macro_rules! adamw_args {
    ($($working:expr)?) => {
        &[
            arg("master", ArgKind::Out(Elem::F32)),
            arg("grads", ArgKind::In(Elem::F32)),
            arg("m", ArgKind::Out(Elem::F32)),
            arg("v", ArgKind::Out(Elem::F32)),
            $(arg("working", ArgKind::Out($working)),)?
            arg("decay_ranges", ArgKind::In(Elem::U32)),
            arg("n_ranges", ArgKind::U32),
            arg("state", ArgKind::In(Elem::U32)),
            arg("n", ArgKind::U64),
            arg("offset", ArgKind::U64),
            arg("seed", ArgKind::U64),
            arg("lr", ArgKind::F32),
            arg("beta1", ArgKind::F32),
            arg("beta2", ArgKind::F32),
            arg("eps", ArgKind::F32),
            arg("weight_decay", ArgKind::F32),
            arg("unscale", ArgKind::U32),
        ]
    };
}

const ARGS_NONE: &[Arg] = adamw_args!();
const ARGS_BF16: &[Arg] = adamw_args!(Elem::BF16);
const ARGS_F16: &[Arg] = adamw_args!(Elem::F16);

/// `Problem::elems(n)`. Buffers: `master, m, v (n) f32` (read and written), `grads (n) f32`,
/// `decay_ranges (4 * n_ranges) u32` ([`DecayRanges::words`]), `state (16) u32`. `offset`:
/// global index of element 0 (a shard's start); `seed`: ignored (no stochastic rounding).
pub static ADAMW_F32: KernelDesc = KernelDesc {
    entry: "lathe_adamw_f32",
    module: &MODULE,
    args: ARGS_NONE,
    geometry,
    cost: |p| cost(p, 0),
    summary: "fused AdamW step over a flat fp32 buffer (device-side skip, scale, clip, step)",
};

/// [`ADAMW_F32`] plus `working (n) bf16 = round_nearest_even(master)`.
pub static ADAMW_F32_BF16: KernelDesc = KernelDesc {
    entry: "lathe_adamw_f32_bf16",
    module: &MODULE,
    args: ARGS_BF16,
    geometry,
    cost: |p| cost(p, 2),
    summary: "fused AdamW step, bf16 working copy (round to nearest even)",
};

/// [`ADAMW_F32`] plus `working (n) bf16` stochastically rounded from `(seed, t, offset + i)`.
pub static ADAMW_F32_BF16_SR: KernelDesc = KernelDesc {
    entry: "lathe_adamw_f32_bf16_sr",
    module: &MODULE,
    args: ARGS_BF16,
    geometry,
    cost: |p| cost(p, 2),
    summary: "fused AdamW step, bf16 working copy with stochastic rounding",
};

/// [`ADAMW_F32`] plus `working (n) f16 = round_nearest_even(master)`.
pub static ADAMW_F32_F16: KernelDesc = KernelDesc {
    entry: "lathe_adamw_f32_f16",
    module: &MODULE,
    args: ARGS_F16,
    geometry,
    cost: |p| cost(p, 2),
    summary: "fused AdamW step, f16 working copy (round to nearest even)",
};

/// Every kernel of this module.
pub static ALL: &[&KernelDesc] = &[
    &ADAMW_F32,
    &ADAMW_F32_BF16,
    &ADAMW_F32_BF16_SR,
    &ADAMW_F32_F16,
];

/// The kernel for a working-copy kind.
pub fn kernel_for(w: Working) -> &'static KernelDesc {
    match w {
        Working::None => &ADAMW_F32,
        Working::Bf16 => &ADAMW_F32_BF16,
        Working::Bf16Stochastic => &ADAMW_F32_BF16_SR,
        Working::F16 => &ADAMW_F32_F16,
    }
}

/// A decay-range table that breaks the kernel's contract.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecayRangesError {
    #[error("decay range {index} ({start}..{end}) is empty or reversed")]
    Empty { index: usize, start: u64, end: u64 },
    #[error(
        "decay ranges {index} and {next} are not sorted and separated \
         ({a_start}..{a_end} then {b_start}..{b_end}); merge adjacent ranges first"
    )]
    Order {
        index: usize,
        next: usize,
        a_start: u64,
        a_end: u64,
        b_start: u64,
        b_end: u64,
    },
    #[error("{count} decay ranges do not fit the kernel's u32 count")]
    TooMany { count: usize },
}

/// The weight-decay table: sorted, disjoint, non-adjacent, non-empty half-open ranges of
/// global element indices. On the device: 4 u32 words per range (start, end as little-endian
/// u64), at least 4 words so the buffer is never empty.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DecayRanges {
    ranges: Vec<Range<u64>>,
}

impl DecayRanges {
    /// Checks the contract (sorted, each non-empty, a gap of at least one element between
    /// consecutive ranges).
    pub fn new(ranges: Vec<Range<u64>>) -> Result<Self, DecayRangesError> {
        for (index, r) in ranges.iter().enumerate() {
            if r.start >= r.end {
                return Err(DecayRangesError::Empty {
                    index,
                    start: r.start,
                    end: r.end,
                });
            }
        }
        for (index, w) in ranges.windows(2).enumerate() {
            if w[1].start <= w[0].end {
                return Err(DecayRangesError::Order {
                    index,
                    next: index + 1,
                    a_start: w[0].start,
                    a_end: w[0].end,
                    b_start: w[1].start,
                    b_end: w[1].end,
                });
            }
        }
        if u32::try_from(ranges.len()).is_err() {
            return Err(DecayRangesError::TooMany {
                count: ranges.len(),
            });
        }
        Ok(DecayRanges { ranges })
    }

    /// Sorts, drops empty ranges and merges overlapping or adjacent ones.
    pub fn merged(ranges: impl IntoIterator<Item = Range<u64>>) -> Result<Self, DecayRangesError> {
        let mut v: Vec<Range<u64>> = ranges.into_iter().filter(|r| r.start < r.end).collect();
        v.sort_by_key(|r| r.start);
        let mut out: Vec<Range<u64>> = Vec::with_capacity(v.len());
        for r in v {
            match out.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => out.push(r),
            }
        }
        DecayRanges::new(out)
    }

    /// Every element decays (`0..n`), or none when `n == 0`.
    pub fn all(n: u64) -> Self {
        DecayRanges {
            ranges: std::iter::once(0..n).filter(|r| !r.is_empty()).collect(),
        }
    }

    pub fn ranges(&self) -> &[Range<u64>] {
        &self.ranges
    }

    /// Number of ranges (the kernel's `n_ranges`).
    pub fn count(&self) -> u32 {
        self.ranges.len() as u32
    }

    /// The device table.
    pub fn words(&self) -> Vec<u32> {
        let mut w = Vec::with_capacity(4 * self.ranges.len().max(1));
        for r in &self.ranges {
            for x in [r.start, r.end] {
                w.push(x as u32);
                w.push((x >> 32) as u32);
            }
        }
        w.resize(w.len().max(4), 0);
        w
    }

    /// Whether global index `gi` takes weight decay.
    pub fn decays(&self, gi: u64) -> bool {
        let k = self.ranges.partition_point(|r| r.end <= gi);
        self.ranges.get(k).is_some_and(|r| r.start <= gi)
    }
}

/// CPU twins: the kernel's arithmetic, bit for bit.
pub mod twin {
    use super::DecayRanges;
    use crate::nn::amp::StepState;
    use half::{bf16, f16};

    /// Host-side hyperparameters of one launch.
    #[derive(Clone, Copy, Debug, PartialEq)]
    pub struct Hyper {
        pub lr: f32,
        pub beta1: f32,
        pub beta2: f32,
        pub eps: f32,
        pub weight_decay: f32,
    }

    /// The working copy a step writes.
    pub enum WorkingMut<'a> {
        None,
        Bf16(&'a mut [bf16]),
        Bf16Stochastic(&'a mut [bf16]),
        F16(&'a mut [f16]),
    }

    /// `f32(1 - beta^t)` with `beta^t` by repeated squaring in f64, as the kernel forms it.
    pub fn bias_correction(beta: f32, t: u32) -> f32 {
        let mut r = 1f64;
        let mut b = beta as f64;
        let mut e = t;
        while e != 0 {
            if e & 1 == 1 {
                r *= b;
            }
            b *= b;
            e >>= 1;
        }
        (1.0 - r) as f32
    }

    /// splitmix64's output function.
    pub fn mix64(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// The per-step key of stochastic rounding: `mix64(seed ^ mix64(t + golden))`.
    pub fn stochastic_key(seed: u64, t: u64) -> u64 {
        mix64(seed ^ mix64(t.wrapping_add(0x9E37_79B9_7F4A_7C15)))
    }

    /// 16 random bits for global index `gi`.
    pub fn stochastic_bits(key: u64, gi: u64) -> u16 {
        (mix64(key ^ gi.wrapping_mul(0xD1B5_4A32_D192_ED03)) >> 48) as u16
    }

    /// bf16 from the upper half of `bits(x) + r`: rounds up with probability (dropped bits)
    /// / 2^16. NaN maps to a quiet NaN.
    pub fn bf16_stochastic(x: f32, r: u16) -> bf16 {
        if x.is_nan() {
            return bf16::from_f32(x);
        }
        bf16::from_bits((x.to_bits().wrapping_add(r as u32) >> 16) as u16)
    }

    /// One fused step over `master, grads, m, v` (same length, element 0 at global index
    /// `offset`), as the kernel does it. Returns false (touching nothing) when the state says
    /// the gradients were not finite.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        master: &mut [f32],
        grads: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        mut working: WorkingMut<'_>,
        ranges: &DecayRanges,
        state: &StepState,
        offset: u64,
        seed: u64,
        h: &Hyper,
        unscale: bool,
    ) -> bool {
        if state.found_inf {
            return false;
        }
        let t = state.step.wrapping_add(1);
        let gs = (if unscale { state.inv_scale } else { 1.0 }) * state.clip;
        let omb1 = 1.0 - h.beta1;
        let omb2 = 1.0 - h.beta2;
        let bc1 = bias_correction(h.beta1, t);
        let bc2 = bias_correction(h.beta2, t);
        let key = stochastic_key(seed, t as u64);
        for i in 0..master.len() {
            let gi = offset + i as u64;
            let g = grads[i] * gs;
            let m_new = h.beta1 * m[i] + omb1 * g;
            let v_new = h.beta2 * v[i] + omb2 * (g * g);
            let mut u = (m_new / bc1) / ((v_new / bc2).sqrt() + h.eps);
            if ranges.decays(gi) {
                u += h.weight_decay * master[i];
            }
            let p = master[i] - h.lr * u;
            master[i] = p;
            m[i] = m_new;
            v[i] = v_new;
            match &mut working {
                WorkingMut::None => {}
                WorkingMut::Bf16(w) => w[i] = bf16::from_f32(p),
                WorkingMut::Bf16Stochastic(w) => {
                    w[i] = bf16_stochastic(p, stochastic_bits(key, gi))
                }
                WorkingMut::F16(w) => w[i] = f16::from_f32(p),
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::twin::*;
    use super::*;
    use crate::nn::amp::StepState;
    use crate::rng::Rng;
    use half::bf16;

    fn hyper() -> Hyper {
        Hyper {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }

    #[test]
    fn step_matches_an_f64_adamw() {
        let mut rng = Rng::new(1);
        let n = 1000;
        let mut p = rng.vec_f32(n, -1.0, 1.0);
        let g = rng.vec_f32(n, -1.0, 1.0);
        let mut m = rng.vec_f32(n, -0.1, 0.1);
        let mut v = rng.vec_f32(n, 0.0, 0.01);
        let (p0, m0, v0) = (p.clone(), m.clone(), v.clone());
        let ranges = DecayRanges::new(vec![100..400, 700..701]).unwrap();
        let mut state = StepState::new(4.0);
        state.step = 9;
        state.clip = 0.5;
        let h = hyper();
        assert!(step(
            &mut p,
            &g,
            &mut m,
            &mut v,
            WorkingMut::None,
            &ranges,
            &state,
            0,
            0,
            &h,
            true
        ));
        let t = 10.0;
        for i in 0..n {
            let gg = g[i] as f64 * 0.25 * 0.5;
            let mm = 0.9 * m0[i] as f64 + 0.1 * gg;
            let vv = 0.95 * v0[i] as f64 + 0.05 * gg * gg;
            let mut u =
                (mm / (1.0 - 0.9f64.powf(t))) / ((vv / (1.0 - 0.95f64.powf(t))).sqrt() + 1e-8);
            if (100..400).contains(&i) || i == 700 {
                u += 0.1 * p0[i] as f64;
            }
            let want = p0[i] as f64 - 1e-3 * u;
            assert!((p[i] as f64 - want).abs() < 1e-6, "element {i}");
            assert!((m[i] as f64 - mm).abs() < 1e-6);
            assert!((v[i] as f64 - vv).abs() < 1e-7);
        }
    }

    #[test]
    fn a_non_finite_step_touches_nothing() {
        let mut p = vec![1.0f32; 8];
        let mut m = vec![0.5f32; 8];
        let mut v = vec![0.25f32; 8];
        let mut w = vec![bf16::from_f32(7.0); 8];
        let mut state = StepState::new(1.0);
        state.found_inf = true;
        let applied = step(
            &mut p,
            &[1.0; 8],
            &mut m,
            &mut v,
            WorkingMut::Bf16(&mut w),
            &DecayRanges::all(8),
            &state,
            0,
            0,
            &hyper(),
            false,
        );
        assert!(!applied);
        assert_eq!((p[0], m[0], v[0], w[0].to_f32()), (1.0, 0.5, 0.25, 7.0));
    }

    #[test]
    fn bias_correction_is_close_to_powf() {
        for t in [1u32, 2, 3, 10, 1000, 123_457] {
            for beta in [0.9f32, 0.95, 0.999] {
                let want = (1.0 - (beta as f64).powf(t as f64)) as f32;
                let got = bias_correction(beta, t);
                assert!(
                    (got - want).abs() <= f32::EPSILON * want.abs(),
                    "{beta}^{t}: {got} vs {want}"
                );
            }
        }
        assert_eq!(bias_correction(0.9, 1), (1.0 - 0.9f32 as f64) as f32);
    }

    #[test]
    fn stochastic_rounding_is_reproducible_and_unbiased() {
        let key = stochastic_key(42, 3);
        assert_eq!(key, stochastic_key(42, 3));
        assert_ne!(key, stochastic_key(42, 4));
        let x = 1.0f32 + 3.0 / 1024.0; // 3/8 of the way from 1.0 to the next bf16
        let n = 1 << 16;
        let mean: f64 = (0..n)
            .map(|i| bf16_stochastic(x, stochastic_bits(key, i)).to_f32() as f64)
            .sum::<f64>()
            / n as f64;
        assert!((mean - x as f64).abs() < 1e-4, "{mean}");
        for exact in [0.0f32, -2.0, 1.5, f32::INFINITY] {
            assert_eq!(bf16_stochastic(exact, 0xFFFF).to_f32(), exact);
        }
        assert!(bf16_stochastic(f32::NAN, 0xFFFF).is_nan());
    }

    #[test]
    fn decay_ranges_validate_merge_and_look_up() {
        assert!(DecayRanges::new(vec![0..4, 4..8]).is_err(), "adjacent");
        assert!(DecayRanges::new(vec![5..9, 0..4]).is_err(), "unsorted");
        assert!(
            DecayRanges::new(std::iter::once(3..3).collect()).is_err(),
            "empty"
        );
        let r = DecayRanges::merged(vec![4..8, 0..4, 10..12, 11..13, 20..20]).unwrap();
        assert_eq!(r.ranges(), &[0..8, 10..13]);
        assert!(r.decays(0) && r.decays(7) && !r.decays(8) && !r.decays(9));
        assert!(r.decays(12) && !r.decays(13));
        let w = r.words();
        assert_eq!(w, vec![0, 0, 8, 0, 10, 0, 13, 0]);
        let big = DecayRanges::new(std::iter::once((1u64 << 33)..(1u64 << 34)).collect()).unwrap();
        assert_eq!(big.words(), vec![0, 2, 0, 4]);
        assert_eq!(DecayRanges::default().words(), vec![0; 4]);
        assert_eq!(DecayRanges::default().count(), 0);
    }

    #[test]
    fn decay_applies_only_inside_ranges() {
        let n = 12;
        let mut p = vec![2.0f32; n];
        let mut m = vec![0.0f32; n];
        let mut v = vec![0.0f32; n];
        let ranges = DecayRanges::new(vec![13..15, 17..18]).unwrap();
        let state = StepState::new(1.0);
        step(
            &mut p,
            &[0.5; 12],
            &mut m,
            &mut v,
            WorkingMut::None,
            &ranges,
            &state,
            10,
            0,
            &hyper(),
            false,
        );
        let decayed: Vec<usize> = (0..n).filter(|&i| p[i] != p[0]).collect();
        assert_eq!(decayed, vec![3, 4, 7]);
    }

    #[test]
    fn ptx_has_no_fused_multiply_add() {
        // The bit-exact contract with the twin rests on every operation being rounded alone.
        let ptx = (MODULE.ptx)();
        assert!(!ptx.contains("fma"), "AdamW PTX must not contain fma");
        assert!(ptx.contains("div.rn.f32") && ptx.contains("sqrt.rn.f32"));
    }
}
