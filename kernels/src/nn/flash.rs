//! Fused causal attention (FlashAttention-2's algorithm on `mma.sync`): no `T x T` matrix in
//! memory, the log-sum-exp saved for the backward, deterministic gradients.
//!
//! Layouts are the ones the GPT block already has, so no head split or merge runs around it:
//! `qkv (B, T, 3C)` packed (queries of head `h` at columns `h hs..`, keys at `C + h hs..`,
//! values at `2C + h hs..`), `y, dy (B, T, C)` (head `h` at columns `h hs..`), `lse, dvec
//! (B, nh, T)` f32, `dqkv (B, T, 3C)` like `qkv`.
//!
//! Per (b, h), with `scale = 1 / sqrt(hs)` passed in:
//!
//! ```text
//! forward:   S = scale Q K^T (causal), lse_i = log sum_j exp S_ij, y = softmax(S) V
//! row dot:   D_i = sum_d dO_id O_id
//! dQ pass:   P = exp(S - lse), dS = P (dO V^T - D), dQ = scale dS K        (per query tile)
//! dK/dV:     dV = P^T dO, dK = scale dS^T Q                                (per key tile)
//! ```
//!
//! The two backward passes each recompute `S` and `dP` for their own tiles: dQ is summed over
//! key tiles inside one block and dK/dV over query tiles inside another, so no float atomics
//! are needed and every gradient element is summed in one fixed order (the same bits on every
//! run). The price is two extra tile products per tile pair against FlashAttention-2's atomic
//! dQ (7 products instead of 5).
//!
//! Kernels come per input type (bf16, f16) and per padded head size `D` (32 or 64: the head
//! size rounded up; columns past `hs` are zero-filled), see [`pick`]. Requirements: `hs` a
//! multiple of 8 and at most 64, `C = nh hs`; other shapes take the unfused path (batched
//! products around [`super::attention`]). Probabilities and score gradients are rounded to
//! the input type before their products (as FlashAttention does); every sum is f32.
//!
//! Memory against the unfused path: per layer the unfused path keeps `S` (f32) and `P` (input
//! type) of `B nh T^2` elements each for the backward, and the backward allocates `dP` and
//! `dS` of the same size; this path keeps `lse` (`B nh T` f32) and allocates `D` of the same
//! size. Geometry and per-kernel napkin math: `NOTES.md`.

use super::flash_ptx::{self, BR, DOT_ROWS, Kind, THREADS};
use crate::desc::{Arg, ArgKind, Cost, Elem, Geometry, KernelDesc, Module, Problem, Target, arg};
use std::borrow::Cow;

/// The padded head sizes kernels exist for.
pub const HEAD_DIMS: [usize; 2] = [32, 64];

/// `Problem { batch: B, n: T, m: nh, k: hs }` for every kernel of the family.
pub fn problem(b: usize, t: usize, nh: usize, hs: usize) -> Problem {
    Problem {
        batch: b as u64,
        n: t as u64,
        m: nh as u64,
        k: hs as u64,
    }
}

fn tiled_geometry(p: &Problem) -> Geometry {
    Geometry {
        grid: (
            p.n.div_ceil(BR as u64).max(1) as u32,
            p.m.max(1) as u32,
            p.batch.max(1) as u32,
        ),
        block: (THREADS, 1, 1),
        shared_bytes: 0,
    }
}

fn dot_geometry(p: &Problem) -> Geometry {
    Geometry {
        grid: (
            (p.batch * p.m * p.n).div_ceil(DOT_ROWS as u64).max(1) as u32,
            1,
            1,
        ),
        block: (32 * DOT_ROWS, 1, 1),
        shared_bytes: 0,
    }
}

/// Score pairs `(i, j)` with `j <= i` over all heads: `B nh T (T + 1) / 2`.
fn pairs(p: &Problem) -> u64 {
    p.batch * p.m * p.n * (p.n + 1) / 2
}

/// Elements of one `(B, T, C)` tensor.
fn btc(p: &Problem) -> u64 {
    p.batch * p.n * p.m * p.k
}

macro_rules! fwd_args {
    ($dt:expr) => {
        &[
            arg("qkv", ArgKind::In($dt)),
            arg("y", ArgKind::Out($dt)),
            arg("lse", ArgKind::Out(Elem::F32)),
            arg("t", ArgKind::U32),
            arg("nh", ArgKind::U32),
            arg("hs", ArgKind::U32),
            arg("scale", ArgKind::F32),
        ]
    };
}

macro_rules! bwd_args {
    ($dt:expr) => {
        &[
            arg("qkv", ArgKind::In($dt)),
            arg("dy", ArgKind::In($dt)),
            arg("lse", ArgKind::In(Elem::F32)),
            arg("dvec", ArgKind::In(Elem::F32)),
            arg("dqkv", ArgKind::Out($dt)),
            arg("t", ArgKind::U32),
            arg("nh", ArgKind::U32),
            arg("hs", ArgKind::U32),
            arg("scale", ArgKind::F32),
        ]
    };
}

macro_rules! dot_args {
    ($dt:expr) => {
        &[
            arg("y", ArgKind::In($dt)),
            arg("dy", ArgKind::In($dt)),
            arg("dvec", ArgKind::Out(Elem::F32)),
            arg("rows", ArgKind::U32),
            arg("t", ArgKind::U32),
            arg("nh", ArgKind::U32),
            arg("hs", ArgKind::U32),
        ]
    };
}

const FWD_BF16: &[Arg] = fwd_args!(Elem::BF16);
const FWD_F16: &[Arg] = fwd_args!(Elem::F16);
const BWD_BF16: &[Arg] = bwd_args!(Elem::BF16);
const BWD_F16: &[Arg] = bwd_args!(Elem::F16);
const DOT_BF16: &[Arg] = dot_args!(Elem::BF16);
const DOT_F16: &[Arg] = dot_args!(Elem::F16);

macro_rules! tiled {
    ($name:ident, $entry:literal, $args:ident, $flops:literal, $summary:literal) => {
        #[doc = concat!("`", $entry, "`: ", $summary, " (see the module docs).")]
        pub static $name: KernelDesc = KernelDesc {
            entry: $entry,
            module: &MODULE,
            args: $args,
            geometry: tiled_geometry,
            cost: |p| Cost {
                flops: $flops * pairs(p) * p.k,
                bytes: 2 * 3 * btc(p) + 2 * btc(p) + 4 * p.batch * p.m * p.n,
            },
            summary: $summary,
        };
    };
}

tiled!(
    FWD_BF16_D32,
    "lathe_flash_attn_fwd_bf16_d32",
    FWD_BF16,
    4,
    "fused causal attention forward, bf16, head size <= 32"
);
tiled!(
    FWD_BF16_D64,
    "lathe_flash_attn_fwd_bf16_d64",
    FWD_BF16,
    4,
    "fused causal attention forward, bf16, head size <= 64"
);
tiled!(
    FWD_F16_D32,
    "lathe_flash_attn_fwd_f16_d32",
    FWD_F16,
    4,
    "fused causal attention forward, f16, head size <= 32"
);
tiled!(
    FWD_F16_D64,
    "lathe_flash_attn_fwd_f16_d64",
    FWD_F16,
    4,
    "fused causal attention forward, f16, head size <= 64"
);
tiled!(
    DQ_BF16_D32,
    "lathe_flash_attn_bwd_dq_bf16_d32",
    BWD_BF16,
    6,
    "fused causal attention backward, dQ pass, bf16, head size <= 32"
);
tiled!(
    DQ_BF16_D64,
    "lathe_flash_attn_bwd_dq_bf16_d64",
    BWD_BF16,
    6,
    "fused causal attention backward, dQ pass, bf16, head size <= 64"
);
tiled!(
    DQ_F16_D32,
    "lathe_flash_attn_bwd_dq_f16_d32",
    BWD_F16,
    6,
    "fused causal attention backward, dQ pass, f16, head size <= 32"
);
tiled!(
    DQ_F16_D64,
    "lathe_flash_attn_bwd_dq_f16_d64",
    BWD_F16,
    6,
    "fused causal attention backward, dQ pass, f16, head size <= 64"
);
tiled!(
    DKDV_BF16_D32,
    "lathe_flash_attn_bwd_dkdv_bf16_d32",
    BWD_BF16,
    8,
    "fused causal attention backward, dK/dV pass, bf16, head size <= 32"
);
tiled!(
    DKDV_BF16_D64,
    "lathe_flash_attn_bwd_dkdv_bf16_d64",
    BWD_BF16,
    8,
    "fused causal attention backward, dK/dV pass, bf16, head size <= 64"
);
tiled!(
    DKDV_F16_D32,
    "lathe_flash_attn_bwd_dkdv_f16_d32",
    BWD_F16,
    8,
    "fused causal attention backward, dK/dV pass, f16, head size <= 32"
);
tiled!(
    DKDV_F16_D64,
    "lathe_flash_attn_bwd_dkdv_f16_d64",
    BWD_F16,
    8,
    "fused causal attention backward, dK/dV pass, f16, head size <= 64"
);

macro_rules! dot {
    ($name:ident, $entry:literal, $args:ident) => {
        #[doc = concat!("`", $entry, "`: the backward's row dot `D = rowsum(dO * O)`.")]
        pub static $name: KernelDesc = KernelDesc {
            entry: $entry,
            module: &MODULE,
            args: $args,
            geometry: dot_geometry,
            cost: |p| Cost {
                flops: 2 * btc(p),
                bytes: 4 * btc(p) + 4 * p.batch * p.m * p.n,
            },
            summary: "fused attention backward: row dot of dO and O",
        };
    };
}

dot!(DOT_BF16_K, "lathe_flash_attn_rowdot_bf16", DOT_BF16);
dot!(DOT_F16_K, "lathe_flash_attn_rowdot_f16", DOT_F16);

/// Every kernel of the family: per dtype (bf16, f16) and head size (32, 64) forward, dQ,
/// dK/dV; then the row dots.
pub static ALL: &[&KernelDesc] = &[
    &FWD_BF16_D32,
    &DQ_BF16_D32,
    &DKDV_BF16_D32,
    &FWD_BF16_D64,
    &DQ_BF16_D64,
    &DKDV_BF16_D64,
    &FWD_F16_D32,
    &DQ_F16_D32,
    &DKDV_F16_D32,
    &FWD_F16_D64,
    &DQ_F16_D64,
    &DKDV_F16_D64,
    &DOT_BF16_K,
    &DOT_F16_K,
];

/// The kernels of one (dtype, head size).
#[derive(Clone, Copy, Debug)]
pub struct Kernels {
    pub forward: &'static KernelDesc,
    pub dq: &'static KernelDesc,
    pub dkdv: &'static KernelDesc,
    pub row_dot: &'static KernelDesc,
    /// The padded head size.
    pub d: usize,
}

/// Why a shape cannot take the fused kernels (it takes the unfused path).
pub fn unsupported(e: Elem, hs: usize) -> Option<String> {
    if !matches!(e, Elem::BF16 | Elem::F16) {
        return Some(format!("{e:?} inputs (the fused kernels take bf16 or f16)"));
    }
    if hs == 0 || !hs.is_multiple_of(8) || hs > HEAD_DIMS[HEAD_DIMS.len() - 1] {
        return Some(format!(
            "head size {hs} (the fused kernels take multiples of 8 up to {})",
            HEAD_DIMS[HEAD_DIMS.len() - 1]
        ));
    }
    None
}

/// The kernels for inputs of type `e` and head size `hs`, or `None` (see [`unsupported`]).
pub fn pick(e: Elem, hs: usize) -> Option<Kernels> {
    if unsupported(e, hs).is_some() {
        return None;
    }
    let di = HEAD_DIMS.iter().position(|&d| hs <= d)?;
    let base = match e {
        Elem::BF16 => 0,
        _ => 6,
    } + 3 * di;
    Some(Kernels {
        forward: ALL[base],
        dq: ALL[base + 1],
        dkdv: ALL[base + 2],
        row_dot: if e == Elem::BF16 { ALL[12] } else { ALL[13] },
        d: HEAD_DIMS[di],
    })
}

fn module_ptx() -> Cow<'static, str> {
    let mut s = crate::ptx::header(Target::Sm80);
    for (i, dt) in [Elem::BF16, Elem::F16].into_iter().enumerate() {
        for (j, d) in HEAD_DIMS.into_iter().enumerate() {
            let base = 6 * i + 3 * j;
            s.push_str(&flash_ptx::forward(ALL[base].entry, dt, d));
            s.push_str(&flash_ptx::backward_dq(ALL[base + 1].entry, dt, d));
            s.push_str(&flash_ptx::backward_dkdv(ALL[base + 2].entry, dt, d));
        }
        s.push_str(&flash_ptx::row_dot(ALL[12 + i].entry, dt));
    }
    Cow::Owned(s)
}

/// Static shared memory per block of a tiled kernel (bytes), for reports.
pub fn shared_bytes_of(k: &KernelDesc) -> usize {
    let d = if k.entry.ends_with("_d32") { 32 } else { 64 };
    let kind = if k.entry.contains("_fwd_") {
        Kind::Fwd
    } else if k.entry.contains("_dq_") {
        Kind::Dq
    } else if k.entry.contains("_dkdv_") {
        Kind::Dkdv
    } else {
        return 0;
    };
    flash_ptx::shared_bytes(kind, d)
}

/// The module of this family.
pub static MODULE: Module = Module {
    name: "nn_flash_attention",
    target: Target::Sm80,
    ptx: module_ptx,
};

/// CPU twins in f64 (inputs converted exactly, no intermediate rounding).
pub mod twin {
    use crate::elementwise::twin::Float;

    /// Shape of one call.
    #[derive(Clone, Copy, Debug)]
    pub struct Shape {
        pub b: usize,
        pub t: usize,
        pub nh: usize,
        pub hs: usize,
    }

    impl Shape {
        fn c(&self) -> usize {
            self.nh * self.hs
        }
        fn q(&self, qkv: &[f64], bz: usize, i: usize, h: usize, part: usize, d: usize) -> f64 {
            let c = self.c();
            qkv[(bz * self.t + i) * 3 * c + part * c + h * self.hs + d]
        }
    }

    fn f64s<T: Float>(v: &[T]) -> Vec<f64> {
        v.iter().map(|x| x.to_f32() as f64).collect()
    }

    /// Probabilities of one (b, h): `p[i][j]` for `j <= i`, and `lse`.
    fn probs(s: &Shape, qkv: &[f64], bz: usize, h: usize) -> (Vec<Vec<f64>>, Vec<f64>) {
        let scale = 1.0 / (s.hs as f64).sqrt();
        let mut p = Vec::with_capacity(s.t);
        let mut lse = Vec::with_capacity(s.t);
        for i in 0..s.t {
            let row: Vec<f64> = (0..=i)
                .map(|j| {
                    scale
                        * (0..s.hs)
                            .map(|d| s.q(qkv, bz, i, h, 0, d) * s.q(qkv, bz, j, h, 1, d))
                            .sum::<f64>()
                })
                .collect();
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = row.iter().map(|x| (x - m).exp()).sum();
            lse.push(m + z.ln());
            p.push(row.iter().map(|x| (x - m).exp() / z).collect());
        }
        (p, lse)
    }

    /// `y (B, T, C)` and `lse (B, nh, T)` from `qkv (B, T, 3C)`, in f64.
    pub fn forward<T: Float>(s: &Shape, qkv: &[T]) -> (Vec<f64>, Vec<f64>) {
        let x = f64s(qkv);
        let c = s.c();
        let mut y = vec![0f64; s.b * s.t * c];
        let mut lse = vec![0f64; s.b * s.nh * s.t];
        for bz in 0..s.b {
            for h in 0..s.nh {
                let (p, l) = probs(s, &x, bz, h);
                for i in 0..s.t {
                    lse[(bz * s.nh + h) * s.t + i] = l[i];
                    for d in 0..s.hs {
                        y[(bz * s.t + i) * c + h * s.hs + d] =
                            (0..=i).map(|j| p[i][j] * s.q(&x, bz, j, h, 2, d)).sum();
                    }
                }
            }
        }
        (y, lse)
    }

    /// `dvec (B, nh, T)`: the row dots of `y` and `dy`.
    pub fn row_dot<T: Float>(s: &Shape, y: &[T], dy: &[T]) -> Vec<f64> {
        let c = s.c();
        let mut out = vec![0f64; s.b * s.nh * s.t];
        for bz in 0..s.b {
            for h in 0..s.nh {
                for i in 0..s.t {
                    let at = |d: usize| (bz * s.t + i) * c + h * s.hs + d;
                    out[(bz * s.nh + h) * s.t + i] = (0..s.hs)
                        .map(|d| y[at(d)].to_f32() as f64 * dy[at(d)].to_f32() as f64)
                        .sum();
                }
            }
        }
        out
    }

    /// `dqkv (B, T, 3C)` from `qkv` and `dy (B, T, C)`: the exact gradient in f64.
    pub fn backward<T: Float>(s: &Shape, qkv: &[T], dy: &[T]) -> Vec<f64> {
        let x = f64s(qkv);
        let g = f64s(dy);
        let c = s.c();
        let scale = 1.0 / (s.hs as f64).sqrt();
        let mut dx = vec![0f64; x.len()];
        for bz in 0..s.b {
            for h in 0..s.nh {
                let (p, _) = probs(s, &x, bz, h);
                let go = |i: usize, d: usize| g[(bz * s.t + i) * c + h * s.hs + d];
                let at = |i: usize, part: usize, d: usize| {
                    (bz * s.t + i) * 3 * c + part * c + h * s.hs + d
                };
                for i in 0..s.t {
                    // dP_ij = dO_i . V_j; dS_ij = P_ij (dP_ij - sum_k P_ik dP_ik).
                    let dp: Vec<f64> = (0..=i)
                        .map(|j| (0..s.hs).map(|d| go(i, d) * x[at(j, 2, d)]).sum())
                        .collect();
                    let dot: f64 = (0..=i).map(|j| p[i][j] * dp[j]).sum();
                    for j in 0..=i {
                        let ds = p[i][j] * (dp[j] - dot);
                        for d in 0..s.hs {
                            dx[at(j, 2, d)] += p[i][j] * go(i, d);
                            dx[at(i, 0, d)] += scale * ds * x[at(j, 1, d)];
                            dx[at(j, 1, d)] += scale * ds * x[at(i, 0, d)];
                        }
                    }
                }
            }
        }
        dx
    }
}

#[cfg(test)]
mod tests {
    use super::twin::*;
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn pick_covers_the_supported_shapes() {
        for e in [Elem::BF16, Elem::F16] {
            for hs in (8..=64).step_by(8) {
                let k = pick(e, hs).expect("supported");
                assert!(k.d >= hs && k.d - hs < 32, "{e:?} {hs}");
                assert!(
                    k.forward
                        .entry
                        .contains(if e == Elem::BF16 { "bf16" } else { "f16" })
                );
                assert!(k.forward.entry.ends_with(&format!("_d{}", k.d)));
            }
            for hs in [0, 4, 12, 72, 128] {
                assert!(pick(e, hs).is_none(), "{hs}");
                assert!(unsupported(e, hs).unwrap().contains(&hs.to_string()));
            }
        }
        assert!(pick(Elem::F32, 64).is_none());
    }

    /// The twin's backward against central differences of its forward (loss = sum y * g).
    #[test]
    fn twin_backward_matches_finite_differences() {
        let s = Shape {
            b: 1,
            t: 5,
            nh: 2,
            hs: 3,
        };
        let mut rng = Rng::new(41);
        let x = rng.vec_f32(s.b * s.t * 3 * s.nh * s.hs, -1.0, 1.0);
        let g = rng.vec_f32(s.b * s.t * s.nh * s.hs, -1.0, 1.0);
        let loss = |x: &[f32]| -> f64 {
            let (y, _) = forward(&s, x);
            y.iter().zip(&g).map(|(a, &b)| a * b as f64).sum()
        };
        let dx = backward(&s, &x, &g);
        for k in 0..x.len() {
            let h = 1e-3f32;
            let (mut a, mut b) = (x.clone(), x.clone());
            a[k] += h;
            b[k] -= h;
            let fd = (loss(&a) - loss(&b)) / ((a[k] - b[k]) as f64);
            assert!((dx[k] - fd).abs() < 1e-4, "{k}: {} vs {fd}", dx[k]);
        }
    }
}
