//! A PTX interpreter for the GEMM kernels, for tests on machines without a GPU.
//!
//! It executes the exact text the generator prints (the subset of PTX it uses) for whole grids:
//! warps in lockstep, `bar.sync` as epochs, `cp.async` landing as late as its `wait_group`
//! allows, `ldmatrix` and `mma.sync` with the fragment layouts of the PTX ISA (the `mma` layout
//! is the one the H100 probe verified), and checks races, alignment, bounds and bank conflicts
//! on the way ([`exec`]). What it cannot show: the hardware's actual timing, and instruction
//! semantics that differ from the PTX ISA description it models.

pub mod exec;
pub mod parse;

#[cfg(test)]
mod tests;

use super::{Gemm, Version, geometry_for, twin};
use crate::desc::Elem;
use crate::rng::Rng;
use exec::{Memory, Stats};
use half::{bf16, f16};

/// Bits of `x` rounded to `e` (bf16, f16 or f32), as little-endian bytes.
pub fn encode(e: Elem, x: f32) -> Vec<u8> {
    match e {
        Elem::BF16 => bf16::from_f32(x).to_bits().to_le_bytes().to_vec(),
        Elem::F16 => f16::from_f32(x).to_bits().to_le_bytes().to_vec(),
        Elem::F32 => x.to_le_bytes().to_vec(),
        _ => unreachable!("GEMM element types are bf16, f16, f32"),
    }
}

/// The f32 value of one element of type `e` at `bytes`.
pub fn decode(e: Elem, bytes: &[u8]) -> f32 {
    match e {
        Elem::BF16 => bf16::from_bits(u16::from_le_bytes([bytes[0], bytes[1]])).to_f32(),
        Elem::F16 => f16::from_bits(u16::from_le_bytes([bytes[0], bytes[1]])).to_f32(),
        Elem::F32 => f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
        _ => unreachable!("GEMM element types are bf16, f16, f32"),
    }
}

/// One simulated launch: the problem, the types, and how to lay out the buffers.
#[derive(Clone, Debug)]
pub struct Case {
    pub version: Version,
    pub g: Gemm,
    pub input: Elem,
    pub output: Elem,
    pub bias: bool,
    /// Elements the A, B and C pointers sit after their allocation's (256-byte aligned) start.
    pub offsets: (usize, usize, usize),
    /// Shared-window address of the dynamic shared memory (a multiple of 16).
    pub shared_base: u64,
    pub seed: u64,
}

/// What a simulated launch produced.
pub struct Outcome {
    /// C (m x n, row-major) as f64.
    pub got: Vec<f64>,
    /// The twin's C, and the same rounded to the output type.
    pub want: Vec<f64>,
    pub want_rounded: Vec<f64>,
    pub stats: Stats,
}

/// Small integers (exact in bf16 / f16 and in f32 sums of the sizes tested).
fn small_ints(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.below(7) as f32 - 3.0).collect()
}

/// Runs `case` through the interpreter: random inputs, NaN in every padding element and (for
/// `beta == 0`) in C, then checks that nothing outside the `m x n` block of C changed.
pub fn run(case: &Case) -> Result<Outcome, String> {
    let g = &case.g;
    g.validate().map_err(|e| e.to_string())?;
    let desc = super::kernel_for(case.version, g.op_a, g.op_b, case.input, case.output)
        .ok_or("no such kernel")?;
    let text = (desc.module.ptx)();
    let entries = parse::parse_module(&text)?;
    let entry = entries
        .iter()
        .find(|e| e.name == desc.entry)
        .ok_or("entry not in module")?;
    let mut rng = Rng::new(case.seed);
    let osz = case.output.size();

    // A buffer of `len` elements (ld-padded) with values in the `rows x cols` region and NaN in
    // the padding, placed `off` elements into its allocation.
    let mut mem = Memory::default();
    mem.shared_base = case.shared_base;
    let mut make = |rows: usize, cols: usize, ld: usize, off: usize, e: Elem, vals: &[f32]| {
        let len = if rows == 0 { 0 } else { (rows - 1) * ld + cols };
        let mut host = vec![f32::NAN; len.max(1) + off + ld];
        for r in 0..rows {
            for c in 0..cols {
                host[off + r * ld + c] = vals[r * cols + c];
            }
        }
        let bytes: Vec<u8> = host.iter().flat_map(|&x| encode(e, x)).collect();
        let base = mem.alloc(bytes.len(), 0);
        (base, bytes, base + (off * e.size()) as u64)
    };
    let (ar, ac) = g.a_stored();
    let (br, bc) = g.b_stored();
    let av = small_ints(&mut rng, ar * ac);
    let bv = small_ints(&mut rng, br * bc);
    let cv: Vec<f32> = if g.beta != 0.0 {
        small_ints(&mut rng, g.m * g.n)
    } else {
        vec![f32::NAN; g.m * g.n]
    };
    let biasv = small_ints(&mut rng, g.n.max(1));
    let (a_base, a_bytes, a_ptr) = make(ar, ac, g.lda(), case.offsets.0, case.input, &av);
    let (b_base, b_bytes, b_ptr) = make(br, bc, g.ldb(), case.offsets.1, case.input, &bv);
    let (c_base, c_bytes, c_ptr) = make(g.m, g.n, g.ldc(), case.offsets.2, case.output, &cv);
    let (bias_base, bias_bytes, bias_ptr) = make(1, g.n, g.n, 0, case.input, &biasv);
    mem.write(a_base, &a_bytes)?;
    mem.write(b_base, &b_bytes)?;
    mem.write(c_base, &c_bytes)?;
    mem.write(bias_base, &bias_bytes)?;

    let t = case.version.tile();
    let geo = geometry_for(&t, &g.problem());
    let params = [
        a_ptr,
        b_ptr,
        c_ptr,
        if case.bias { bias_ptr } else { 0 },
        g.m as u64,
        g.n as u64,
        g.k as u64,
        g.lda() as u64,
        g.ldb() as u64,
        g.ldc() as u64,
        g.alpha.to_bits() as u64,
        g.beta.to_bits() as u64,
        g.flags(case.bias) as u64,
    ];
    let stats = exec::launch(
        entry,
        geo.grid.0,
        geo.block.0,
        geo.shared_bytes,
        &params,
        &mut mem,
    )?;

    // C: the m x n block, and every other byte unchanged.
    let after = mem.read(c_base, c_bytes.len())?;
    let c_off = case.offsets.2 * osz;
    let mut got = Vec::with_capacity(g.m * g.n);
    let mut inside = vec![false; c_bytes.len()];
    for r in 0..g.m {
        for c in 0..g.n {
            let at = c_off + (r * g.ldc() + c) * osz;
            got.push(decode(case.output, &after[at..at + osz]) as f64);
            inside[at..at + osz].iter_mut().for_each(|x| *x = true);
        }
    }
    for (i, (&x, &y)) in after.iter().zip(&c_bytes).enumerate() {
        if !inside[i] && x != y {
            return Err(format!("byte {i} of C outside the m x n block was written"));
        }
    }

    // The twin, on the same values (integers: exact in every input type).
    let stored = |rows: usize, cols: usize, ld: usize, v: &[f32]| -> Vec<f32> {
        let mut s = vec![0f32; if rows == 0 { 0 } else { (rows - 1) * ld + cols }];
        for r in 0..rows {
            for c in 0..cols {
                s[r * ld + c] = v[r * cols + c];
            }
        }
        s
    };
    let a_s = stored(ar, ac, g.lda(), &av);
    let b_s = stored(br, bc, g.ldb(), &bv);
    let c_s = stored(g.m, g.n, g.ldc(), &cv);
    let rows: Vec<usize> = (0..g.m).collect();
    let want = twin::reference(
        g,
        &a_s,
        &b_s,
        case.bias.then_some(&biasv[..g.n]),
        &c_s,
        &rows,
    );
    let want_rounded = want
        .iter()
        .map(|&x| decode(case.output, &encode(case.output, x as f32)) as f64)
        .collect();
    Ok(Outcome {
        got,
        want,
        want_rounded,
        stats,
    })
}
