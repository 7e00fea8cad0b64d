//! Token + position embedding, forward and deterministic backward.
//!
//! Forward: `out[n, c] = wte[tokens[n], c] + wpe[n % T, c]` for the `B*T` tokens of a batch
//! (row-major `(B, T)`), `wte (V, C)`, `wpe (maxT >= T, C)` and `out (B*T, C)` in the activation
//! dtype. A token outside `[0, V)` gets a NaN row instead of an out-of-bounds read.
//!
//! Backward (f32 parameter gradients, accumulated with `+=`):
//! - `dwpe[t, c] += sum_b dout[b*T + t, c]` (`lathe_embedding_bwd_pos_*`), the sum over `b` in
//!   order;
//! - `dwte[v, c] += sum_{n : tokens[n] = v} dout[n, c]` (`lathe_embedding_bwd_tok_*`), the sum
//!   over `n` in ascending order, rows that no token names untouched, tokens outside `[0, V)`
//!   ignored.
//!
//! Both are deterministic without atomics; both twins reproduce the kernels' sums bit for bit.
//! The token backward is sort-free: a block owns a tile of 64 vocabulary rows x 128 channels and
//! walks *all* tokens, keeping those in its rows (see `embedding_ptx`). Its cost is the scan:
//! every block reads the whole token array, `ceil(V/64) * ceil(C/128)` blocks x `4 B*T` bytes
//! (GPT-2 124M: 786 x 6 blocks x 64 KiB = 309 MB, mostly L1/L2 hits), plus `dout` once and the
//! touched rows of `dwte` twice. Tiles holding frequent tokens (a few hundred occurrences in a
//! batch) process their matches serially, 4 loads in flight. Expected tens of microseconds on
//! an H100 (not yet measured); the llm.c alternative (a bucket sort of the tokens on the host,
//! then one warp per distinct token) is the next version if this shows in profiles.

use super::embedding_ptx;
use crate::desc::{Arg, ArgKind, Cost, Elem, Geometry, KernelDesc, Module, Problem, Target, arg};
use std::borrow::Cow;

/// Threads per block of the position backward.
pub const BWD_POS_THREADS: u32 = 256;
/// Vocabulary rows per block of the token backward.
pub const TOK_ROWS: u32 = 64;
/// Channels per block (= threads) of the token backward.
pub const TOK_CHANNELS: u32 = 128;
/// Tokens scanned per step of the token backward (4 per thread).
pub const TOK_CHUNK: u32 = 512;

fn module_ptx() -> Cow<'static, str> {
    let mut s = crate::ptx::header(Target::Sm80);
    for (i, dt) in super::ACT_DTYPES.into_iter().enumerate() {
        s.push_str(&embedding_ptx::forward(ALL[3 * i].entry, dt));
        s.push_str(&embedding_ptx::backward_pos(ALL[3 * i + 1].entry, dt));
        s.push_str(&embedding_ptx::backward_tok(ALL[3 * i + 2].entry, dt));
    }
    Cow::Owned(s)
}

/// The module of this family.
pub static MODULE: Module = Module {
    name: "nn_embedding",
    target: Target::Sm80,
    ptx: module_ptx,
};

fn fwd_geometry(p: &Problem) -> Geometry {
    Geometry {
        grid: (p.batch.div_ceil(8).max(1) as u32, 1, 1),
        block: (256, 1, 1),
        shared_bytes: 0,
    }
}

fn pos_geometry(p: &Problem) -> Geometry {
    Geometry {
        grid: (
            (p.m * p.n).div_ceil(BWD_POS_THREADS as u64).max(1) as u32,
            1,
            1,
        ),
        block: (BWD_POS_THREADS, 1, 1),
        shared_bytes: 0,
    }
}

fn tok_geometry(p: &Problem) -> Geometry {
    Geometry {
        grid: (
            p.k.div_ceil(TOK_ROWS as u64).max(1) as u32,
            p.n.div_ceil(TOK_CHANNELS as u64).max(1) as u32,
            1,
        ),
        block: (TOK_CHANNELS, 1, 1),
        shared_bytes: 0,
    }
}

macro_rules! emb_args {
    ($dt:expr) => {
        (
            &[
                arg("tokens", ArgKind::In(Elem::I32)),
                arg("wte", ArgKind::In($dt)),
                arg("wpe", ArgKind::In($dt)),
                arg("out", ArgKind::Out($dt)),
                arg("n_tokens", ArgKind::U32),
                arg("t", ArgKind::U32),
                arg("c", ArgKind::U32),
                arg("v", ArgKind::U32),
            ],
            &[
                arg("dout", ArgKind::In($dt)),
                arg("dwpe", ArgKind::Out(Elem::F32)),
                arg("b", ArgKind::U32),
                arg("t", ArgKind::U32),
                arg("c", ArgKind::U32),
            ],
            &[
                arg("tokens", ArgKind::In(Elem::I32)),
                arg("dout", ArgKind::In($dt)),
                arg("dwte", ArgKind::Out(Elem::F32)),
                arg("n_tokens", ArgKind::U32),
                arg("c", ArgKind::U32),
                arg("v", ArgKind::U32),
            ],
        )
    };
}

type EmbArgs = (&'static [Arg], &'static [Arg], &'static [Arg]);
const ARGS_F32: EmbArgs = emb_args!(Elem::F32);
const ARGS_BF16: EmbArgs = emb_args!(Elem::BF16);
const ARGS_F16: EmbArgs = emb_args!(Elem::F16);

macro_rules! emb_descs {
    ($f:ident, $bp:ident, $bt:ident, $args:ident, $sfx:literal, $size:literal) => {
        #[doc = concat!("`Problem { batch: B*T, n: C, m: T, k: V }`: `tokens (B*T) i32`, `wte (V, C)`, ",
            "`wpe (maxT, C)`, `out (B*T, C)`, ", $sfx, ".")]
        pub static $f: KernelDesc = KernelDesc {
            entry: concat!("lathe_embedding_fwd_", $sfx),
            module: &MODULE,
            args: $args.0,
            geometry: fwd_geometry,
            cost: |p| Cost {
                flops: p.batch * p.n,
                // wte rows gathered, out written, wpe (T rows) read once, the tokens.
                bytes: $size * (2 * p.batch * p.n + p.m * p.n) + 4 * p.batch,
            },
            summary: "token + position embedding forward",
        };
        #[doc = concat!("`Problem { batch: B, m: T, n: C }`: `dout (B*T, C) ", $sfx,
            "`, `dwpe (T, C) f32` accumulated.")]
        pub static $bp: KernelDesc = KernelDesc {
            entry: concat!("lathe_embedding_bwd_pos_", $sfx),
            module: &MODULE,
            args: $args.1,
            geometry: pos_geometry,
            cost: |p| Cost {
                flops: p.batch * p.m * p.n,
                bytes: $size * p.batch * p.m * p.n + 8 * p.m * p.n,
            },
            summary: "position embedding backward (sum over the batch, in order)",
        };
        #[doc = concat!("`Problem { batch: B*T, n: C, k: V }`: `tokens (B*T) i32`, `dout (B*T, C) ",
            $sfx, "`, `dwte (V, C) f32` accumulated (touched rows only).")]
        pub static $bt: KernelDesc = KernelDesc {
            entry: concat!("lathe_embedding_bwd_tok_", $sfx),
            module: &MODULE,
            args: $args.2,
            geometry: tok_geometry,
            cost: |p| Cost {
                flops: p.batch * p.n,
                // dout once, the tokens once, each token's dwte row read and written.
                bytes: $size * p.batch * p.n + 4 * p.batch + 8 * p.batch.min(p.k) * p.n,
            },
            summary: "token embedding backward, deterministic vocabulary-tile scan",
        };
    };
}

emb_descs!(
    EMBEDDING_FWD_F32,
    EMBEDDING_BWD_POS_F32,
    EMBEDDING_BWD_TOK_F32,
    ARGS_F32,
    "f32",
    4
);
emb_descs!(
    EMBEDDING_FWD_BF16,
    EMBEDDING_BWD_POS_BF16,
    EMBEDDING_BWD_TOK_BF16,
    ARGS_BF16,
    "bf16",
    2
);
emb_descs!(
    EMBEDDING_FWD_F16,
    EMBEDDING_BWD_POS_F16,
    EMBEDDING_BWD_TOK_F16,
    ARGS_F16,
    "f16",
    2
);

/// Every kernel of this module: (forward, position backward, token backward) per dtype.
pub static ALL: &[&KernelDesc] = &[
    &EMBEDDING_FWD_F32,
    &EMBEDDING_BWD_POS_F32,
    &EMBEDDING_BWD_TOK_F32,
    &EMBEDDING_FWD_BF16,
    &EMBEDDING_BWD_POS_BF16,
    &EMBEDDING_BWD_TOK_BF16,
    &EMBEDDING_FWD_F16,
    &EMBEDDING_BWD_POS_F16,
    &EMBEDDING_BWD_TOK_F16,
];

/// The forward kernel for a dtype.
pub fn forward_for(e: Elem) -> Option<&'static KernelDesc> {
    super::by_dtype(e, [ALL[0], ALL[3], ALL[6]])
}

/// The position backward for a dtype.
pub fn backward_pos_for(e: Elem) -> Option<&'static KernelDesc> {
    super::by_dtype(e, [ALL[1], ALL[4], ALL[7]])
}

/// The token backward for a dtype.
pub fn backward_tok_for(e: Elem) -> Option<&'static KernelDesc> {
    super::by_dtype(e, [ALL[2], ALL[5], ALL[8]])
}

/// CPU twins, the kernels' sums in the kernels' order.
pub mod twin {
    use crate::elementwise::twin::Float;

    /// `tokens (n)`, `wte (v, c)`, `wpe (>= t, c)`, `out (n, c)`.
    pub fn forward<T: Float>(
        tokens: &[i32],
        wte: &[T],
        wpe: &[T],
        out: &mut [T],
        t: usize,
        c: usize,
    ) {
        let v = wte.len() / c;
        for (n, &tok) in tokens.iter().enumerate() {
            let o = &mut out[n * c..(n + 1) * c];
            if tok < 0 || tok as usize >= v {
                o.fill(T::from_f32(f32::NAN));
                continue;
            }
            let (e, p) = (tok as usize * c, (n % t) * c);
            for j in 0..c {
                o[j] = T::from_f32(wte[e + j].to_f32() + wpe[p + j].to_f32());
            }
        }
    }

    /// `dout (b * t, c)`, `dwpe (>= t, c)` accumulated.
    pub fn backward_pos<T: Float>(dout: &[T], dwpe: &mut [f32], b: usize, t: usize, c: usize) {
        for idx in 0..t * c {
            let mut s = 0f32;
            for bi in 0..b {
                s += dout[bi * t * c + idx].to_f32();
            }
            dwpe[idx] += s;
        }
    }

    /// `tokens (n)`, `dout (n, c)`, `dwte (v, c)` accumulated over touched rows.
    pub fn backward_tok<T: Float>(tokens: &[i32], dout: &[T], dwte: &mut [f32], c: usize) {
        let v = dwte.len() / c;
        let mut sums = vec![0f32; v * c];
        let mut touched = vec![false; v];
        for (n, &tok) in tokens.iter().enumerate() {
            if tok < 0 || tok as usize >= v {
                continue;
            }
            let r = tok as usize;
            touched[r] = true;
            for j in 0..c {
                sums[r * c + j] += dout[n * c + j].to_f32();
            }
        }
        for r in (0..v).filter(|&r| touched[r]) {
            for j in 0..c {
                dwte[r * c + j] += sums[r * c + j];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::twin::*;

    #[test]
    fn forward_adds_token_and_position_rows() {
        let (v, t, c) = (3, 2, 2);
        let wte: Vec<f32> = (0..v * c).map(|i| i as f32).collect();
        let wpe = vec![100.0f32, 200.0, 300.0, 400.0];
        let mut out = vec![0f32; 4 * c];
        forward(&[2, 0, 1, 7], &wte, &wpe, &mut out, t, c);
        assert_eq!(&out[..6], &[104.0, 205.0, 300.0, 401.0, 102.0, 203.0]);
        assert!(out[6].is_nan() && out[7].is_nan(), "out-of-range token");
    }

    #[test]
    fn backward_sums_by_token_and_position() {
        let (t, c) = (2, 3);
        let tokens = [1, 4, 1, -1];
        let dout: Vec<f32> = (0..4 * c).map(|i| i as f32 + 0.5).collect();
        let mut dwte = vec![10.0f32; 5 * c];
        backward_tok(&tokens, &dout, &mut dwte, c);
        assert_eq!(
            &dwte[c..2 * c],
            &[10.0 + 0.5 + 6.5, 10.0 + 1.5 + 7.5, 10.0 + 2.5 + 8.5]
        );
        assert_eq!(&dwte[4 * c..5 * c], &[13.5, 14.5, 15.5]);
        assert!(dwte[..c].iter().all(|&x| x == 10.0), "untouched row");
        let mut dwpe = vec![1.0f32; t * c];
        backward_pos(&dout, &mut dwpe, 2, t, c);
        assert_eq!(dwpe[0], 1.0 + 0.5 + 6.5);
        assert_eq!(dwpe[5], 1.0 + 5.5 + 11.5);
    }
}
