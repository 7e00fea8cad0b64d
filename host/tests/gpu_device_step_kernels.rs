//! The kernels of the device training step against their CPU twins: the SIMT f32-FMA GEMM
//! (every layout and epilogue, batch 1 and strided batches), the strided-batched tensor-core
//! GEMM, the attention products in one batched launch (both kernels), the bias gradient from f32 / bf16 / f16 gradients, and the head split /
//! merge permutes. Inputs are fresh random values (never zeros); outputs are poisoned with NaN
//! before each launch (unless the kernel reads them), and the gaps between batches and rows
//! are NaN that must stay untouched. Shapes are ragged around the 64 x 64 x 16 tile, batch
//! counts > 1, odd head sizes. Tolerance: `tolerance::rel_tolerance` of the operand type
//! (1e-5 relative Frobenius for f32); the permutes and the bias gradient's order are exact.
//! Runs on a GPU when one is usable, else on the simulated device (sanitizer on).

use half::{bf16, f16};
use lathe_host::step_ops::{Batched, Heads};
use lathe_host::testing::test_device;
use lathe_host::{Device, DeviceBuffer, DeviceElem};
use lathe_kernels::elementwise::twin::Float;
use lathe_kernels::gemm::{Gemm, Op};
use lathe_kernels::nn::{colsum, heads};
use lathe_kernels::rng::Rng;
use lathe_kernels::simt_gemm::{self, twin};
use lathe_kernels::tolerance::{check_close, rel_tolerance};

const OPS: [(Op, Op); 4] = [
    (Op::N, Op::N),
    (Op::N, Op::T),
    (Op::T, Op::N),
    (Op::T, Op::T),
];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Epilogue {
    Plain,
    BiasGelu,
    /// beta = 1 into a random C.
    Accumulate,
    /// alpha = -0.5, beta = 0.25, bias.
    Scaled,
}
const EPILOGUES: [Epilogue; 4] = [
    Epilogue::Plain,
    Epilogue::BiasGelu,
    Epilogue::Accumulate,
    Epilogue::Scaled,
];

/// Which kernel runs a batched product: the default (tensor cores for bf16 / f16 operands,
/// SIMT for f32) or the SIMT kernel for every type.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Path {
    Default,
    Simt,
    /// The SIMT kernel's 128 x 128 tile (f32 only).
    SimtLarge,
}

fn random<T: Float>(rng: &mut Rng, n: usize) -> Vec<T> {
    (0..n)
        .map(|_| {
            // Never zero: magnitudes in [0.05, 1).
            let x = rng.range_f32(0.05, 1.0);
            T::from_f32(if rng.next_u32() & 1 == 0 { x } else { -x })
        })
        .collect()
}

/// `batch` stored matrices of `rows x cols` with leading dimension `ld`, `stride` elements
/// apart: random inside, NaN in every gap.
fn batched_matrix<T: Float>(
    rng: &mut Rng,
    batch: usize,
    stride: usize,
    rows: usize,
    cols: usize,
    ld: usize,
) -> Vec<T> {
    let len = (batch - 1) * stride + rows * ld + cols + 3;
    let mut v = vec![T::from_f32(f32::NAN); len];
    for z in 0..batch {
        for r in 0..rows {
            for c in 0..cols {
                v[z * stride + r * ld + c] = random::<T>(rng, 1)[0];
            }
        }
    }
    v
}

/// Runs one batched GEMM and compares every element of every C with the twin; elements of the
/// C buffer outside the `m x n` blocks must keep their NaN / old bits.
fn run<I, O>(dev: &Device, rng: &mut Rng, bg: Batched, epilogue: Epilogue, path: Path)
where
    I: DeviceElem + Float,
    O: DeviceElem + Float,
{
    let mut bg = bg;
    match epilogue {
        Epilogue::BiasGelu => bg.gemm = bg.gemm.with_gelu(true),
        Epilogue::Accumulate => bg.gemm = bg.gemm.with_beta(1.0),
        Epilogue::Scaled => bg.gemm = bg.gemm.with_alpha(-0.5).with_beta(0.25),
        Epilogue::Plain => {}
    }
    let bias = matches!(epilogue, Epilogue::BiasGelu | Epilogue::Scaled);
    let g = bg.gemm;
    let ((ar, ac), (br, bc)) = (g.a_stored(), g.b_stored());
    let a: Vec<I> = batched_matrix(rng, bg.batch, bg.stride_a, ar, ac, g.lda());
    let b: Vec<I> = batched_matrix(rng, bg.batch, bg.stride_b, br, bc, g.ldb());
    let bias_v: Vec<I> = random(rng, g.n);
    let c0: Vec<O> = if g.beta != 0.0 {
        batched_matrix(rng, bg.batch, bg.stride_c, g.m, g.n, g.ldc())
    } else {
        vec![O::from_f32(f32::NAN); (bg.batch - 1) * bg.stride_c + g.c_len() + 3]
    };
    let da = dev.htod(&a).expect("upload A");
    let db = dev.htod(&b).expect("upload B");
    let dbias = dev.htod(&bias_v).expect("upload bias");
    let mut dc = dev.htod(&c0).expect("upload C");
    let what = format!(
        "{}{} {}->{} batch {} {}x{}x{} (ld {} {} {}, strides {} {} {}) {epilogue:?}",
        g.op_a.letter(),
        g.op_b.letter(),
        I::ELEM.name(),
        O::ELEM.name(),
        bg.batch,
        g.m,
        g.n,
        g.k,
        g.lda(),
        g.ldb(),
        g.ldc(),
        bg.stride_a,
        bg.stride_b,
        bg.stride_c
    );
    let launched = match path {
        Path::Default => dev.gemm_batched(&bg, &da, &db, bias.then_some(&dbias), &mut dc),
        Path::Simt => dev.gemm_batched_simt(&bg, &da, &db, bias.then_some(&dbias), &mut dc),
        Path::SimtLarge => dev.gemm_batched_simt_tile(
            simt_gemm::LARGE,
            &bg,
            &da,
            &db,
            bias.then_some(&dbias),
            &mut dc,
        ),
    };
    launched.unwrap_or_else(|e| panic!("{what} {path:?}: launch: {e}"));
    let out = dc.to_vec().unwrap_or_else(|e| panic!("{what}: {e}"));
    let inside = |i: usize| {
        (0..bg.batch).any(|z| {
            i >= z * bg.stride_c && {
                let j = i - z * bg.stride_c;
                j / g.ldc() < g.m && j % g.ldc() < g.n
            }
        })
    };
    for (i, (&o, &before)) in out.iter().zip(&c0).enumerate() {
        if !inside(i) {
            assert_eq!(
                o.to_f32().to_bits(),
                before.to_f32().to_bits(),
                "{what}: C element {i} outside every m x n block changed"
            );
        }
    }
    let want = twin::reference(&bg, &a, &b, bias.then_some(&bias_v[..]), &c0);
    let mut got = Vec::with_capacity(want.len());
    for z in 0..bg.batch {
        for r in 0..g.m {
            for c in 0..g.n {
                got.push(out[z * bg.stride_c + r * g.ldc() + c].to_f32() as f64);
            }
        }
    }
    check_close(&what, &got, &want, rel_tolerance(I::ELEM)).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn gemm_f32_every_layout_epilogue_and_tail() {
    let dev = test_device("gemm_f32_every_layout_epilogue_and_tail");
    let mut rng = Rng::new(0x5E1);
    // (m, n, k): one element, ragged on every axis around the 64 x 64 x 16 and 128 x 128 x 8
    // tiles, several tiles; both tiles run every shape.
    let shapes: &[(usize, usize, usize)] = if dev.is_sim() {
        &[(1, 1, 1), (67, 33, 17), (20, 130, 45), (131, 129, 9)]
    } else {
        &[
            (1, 1, 1),
            (67, 33, 17),
            (20, 130, 45),
            (131, 129, 9),
            (333, 257, 769),
        ]
    };
    for (s, &(m, n, k)) in shapes.iter().enumerate() {
        for (o, (op_a, op_b)) in OPS.into_iter().enumerate() {
            let e = EPILOGUES[(s + o) % EPILOGUES.len()];
            let g = Gemm::new(m, n, k).with_ops(op_a, op_b);
            for path in [Path::Simt, Path::SimtLarge] {
                run::<f32, f32>(&dev, &mut rng, Batched::single(g), e, path);
            }
        }
    }
    if !dev.is_sim() {
        // A GPT-2-sized fp32 product through the default choice (the 128 x 128 tile).
        let g = Gemm::new(2048, 2304, 768);
        run::<f32, f32>(
            &dev,
            &mut rng,
            Batched::single(g),
            Epilogue::BiasGelu,
            Path::Default,
        );
    }
    // Padded leading dimensions with every epilogue, and the linear-layer wrapper path.
    for (i, e) in EPILOGUES.into_iter().enumerate() {
        let (op_a, op_b) = OPS[i];
        let g = Gemm::new(37, 70, 23).with_ops(op_a, op_b);
        let (ac, bc) = (g.a_stored().1, g.b_stored().1);
        let bg = Batched::single(g.with_ld(ac + 3, bc + 1, 75));
        for path in [Path::Simt, Path::SimtLarge] {
            run::<f32, f32>(&dev, &mut rng, bg, e, path);
        }
    }
}

#[test]
fn gemm_f32_wrapper_matches_batched_single() {
    let dev = test_device("gemm_f32_wrapper_matches_batched_single");
    let mut rng = Rng::new(0x5E2);
    let g = Gemm::new(45, 29, 66).with_ops(Op::T, Op::N);
    let a: Vec<f32> = random(&mut rng, g.a_len());
    let b: Vec<f32> = random(&mut rng, g.b_len());
    let bias: Vec<f32> = random(&mut rng, g.n);
    let da = dev.htod(&a).unwrap();
    let db = dev.htod(&b).unwrap();
    let dbias = dev.htod(&bias).unwrap();
    let mut dc = dev.htod(&vec![f32::NAN; g.c_len()]).unwrap();
    dev.gemm_f32(&g, &da, &db, Some(&dbias), &mut dc)
        .expect("gemm_f32");
    let got: Vec<f64> = dc.to_vec().unwrap().iter().map(|&x| x as f64).collect();
    let want = twin::reference(&Batched::single(g), &a, &b, Some(&bias), &[f32::NAN][..0]);
    check_close(
        "gemm_f32 TN bias",
        &got,
        &want,
        rel_tolerance(lathe_kernels::Elem::F32),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // A wrong output type is refused before launch.
    let mut wrong = dev.htod(&vec![bf16::ZERO; g.c_len()]).unwrap();
    assert!(
        dev.gemm_batched(&Batched::single(g), &da, &db, None, &mut wrong)
            .is_err()
    );
}

/// The six attention products of one layer for `bh` heads of `(t, hs)`, in one launch each,
/// with operands `I` and C in `O`.
fn attention_products<I, O>(dev: &Device, rng: &mut Rng, bh: usize, t: usize, hs: usize, path: Path)
where
    I: DeviceElem + Float,
    O: DeviceElem + Float,
{
    let scale = 1.0 / (hs as f32).sqrt();
    let products = [
        Batched::attention_scores(bh, t, hs, scale),
        Batched::attention_values(bh, t, hs),
        Batched::attention_dprobs(bh, t, hs),
        Batched::attention_dvalues(bh, t, hs),
        Batched::attention_dquery(bh, t, hs, scale),
        Batched::attention_dkeys(bh, t, hs, scale),
    ];
    for (i, bg) in products.into_iter().enumerate() {
        // The weight-gradient style products accumulate; the others overwrite.
        let e = if i % 3 == 2 {
            Epilogue::Accumulate
        } else {
            Epilogue::Plain
        };
        run::<I, O>(dev, rng, bg, e, path);
    }
}

#[test]
fn attention_products_bf16_f16_f32_batched() {
    let dev = test_device("attention_products_bf16_f16_f32_batched");
    let mut rng = Rng::new(0x5E3);
    // (B n_head, T, hs): odd head size and T around the tile edge; GPU: GPT-2 small heads.
    let (bh, t, hs) = if dev.is_sim() {
        (6, 19, 13)
    } else {
        (48, 256, 64)
    };
    for path in [Path::Default, Path::Simt] {
        attention_products::<bf16, bf16>(&dev, &mut rng, bh, t, hs, path);
        attention_products::<bf16, f32>(&dev, &mut rng, bh, t, hs, path);
        attention_products::<f16, f16>(&dev, &mut rng, bh, t, hs, path);
        attention_products::<f16, f32>(&dev, &mut rng, bh, t, hs, path);
    }
    attention_products::<f32, f32>(&dev, &mut rng, bh, t, hs, Path::Default);
    // hs and T multiples of 8: every batch keeps 16-byte alignment (the cp.async path).
    let (bh, t, hs) = if dev.is_sim() {
        (4, 24, 16)
    } else {
        (24, 512, 64)
    };
    attention_products::<bf16, f32>(&dev, &mut rng, bh, t, hs, Path::Default);
    attention_products::<f16, f16>(&dev, &mut rng, bh, t, hs, Path::Default);
}

#[test]
fn batched_gemm_with_gaps_between_batches_and_tiles() {
    let dev = test_device("batched_gemm_with_gaps_between_batches_and_tiles");
    let mut rng = Rng::new(0x5E4);
    for (i, (op_a, op_b)) in OPS.into_iter().enumerate() {
        // Two tiles in m and n, a K tail, padded rows and gaps of NaN between the batches.
        let g = Gemm::new(70, 66, 21).with_ops(op_a, op_b);
        let (ac, bc) = (g.a_stored().1, g.b_stored().1);
        let g = g.with_ld(ac + 2, bc + 5, 67);
        let packed = Batched::packed(g, 3);
        let bg = Batched {
            stride_a: packed.stride_a + 7,
            stride_b: packed.stride_b + 1,
            stride_c: packed.stride_c + 9,
            ..packed
        };
        let e = EPILOGUES[i];
        // Every layout x every operand / output type: each kernel of the family runs here.
        for path in [Path::Default, Path::Simt] {
            run::<f32, f32>(&dev, &mut rng, bg, e, path);
            run::<bf16, bf16>(&dev, &mut rng, bg, e, path);
            run::<bf16, f32>(&dev, &mut rng, bg, e, path);
            run::<f16, f16>(&dev, &mut rng, bg, e, path);
            run::<f16, f32>(&dev, &mut rng, bg, e, path);
        }
        run::<f32, f32>(&dev, &mut rng, bg, e, Path::SimtLarge);
    }
    // A shared operand (stride 0): one weight for every batch.
    let g = Gemm::new(9, 17, 5);
    let bg = Batched {
        stride_b: 0,
        ..Batched::packed(g, 4)
    };
    run::<f32, f32>(&dev, &mut rng, bg, Epilogue::Scaled, Path::Default);
    run::<f32, f32>(&dev, &mut rng, bg, Epilogue::Scaled, Path::SimtLarge);
    // K = 0: C = beta C + bias on both kernels.
    let bg = Batched::packed(Gemm::new(9, 17, 0), 2);
    for path in [Path::Default, Path::Simt] {
        run::<f32, f32>(&dev, &mut rng, bg, Epilogue::Scaled, path);
        run::<bf16, f32>(&dev, &mut rng, bg, Epilogue::Scaled, path);
    }
    run::<f32, f32>(&dev, &mut rng, bg, Epilogue::Scaled, Path::SimtLarge);
    run::<bf16, bf16>(&dev, &mut rng, bg, Epilogue::BiasGelu, Path::Default);
}

fn bias_grad_case<T: DeviceElem + Float>(dev: &Device, rng: &mut Rng, rows: usize, c: usize) {
    let dy: Vec<T> = random(rng, rows * c);
    let before: Vec<f32> = random(rng, c);
    let d_dy = dev.htod(&dy).unwrap();
    let mut d_db = dev.htod(&before).unwrap();
    let what = format!("bias_grad {} ({rows}, {c})", T::ELEM.name());
    dev.bias_grad(&d_dy, rows, c, &mut d_db)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let got = d_db.to_vec().unwrap();
    // Same summation order as the kernels (one pass, or interleaved rows then their sum):
    // the same bits.
    let mut twin_out = before.clone();
    colsum::twin::bias_grad(&dy, rows, c, &mut twin_out);
    for (j, (g, w)) in got.iter().zip(&twin_out).enumerate() {
        assert_eq!(
            g.to_bits(),
            w.to_bits(),
            "{what}: column {j}: {g} vs twin {w}"
        );
    }
    // And close to the exact sum.
    let exact: Vec<f64> = (0..c)
        .map(|j| {
            before[j] as f64
                + (0..rows)
                    .map(|r| dy[r * c + j].to_f32() as f64)
                    .sum::<f64>()
        })
        .collect();
    let got64: Vec<f64> = got.iter().map(|&x| x as f64).collect();
    check_close(
        &what,
        &got64,
        &exact,
        rel_tolerance(lathe_kernels::Elem::F32),
    )
    .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn bias_grad_f32_bf16_f16_deterministic() {
    let dev = test_device("bias_grad_f32_bf16_f16_deterministic");
    let mut rng = Rng::new(0x5E5);
    let shapes: &[(usize, usize)] = if dev.is_sim() {
        // One pass; interleaved 8 ways with 7 tail rows; interleaved 16 ways exactly.
        &[(1, 1), (37, 33), (303, 70), (512, 5)]
    } else {
        &[
            (1, 1),
            (37, 33),
            (303, 70),
            (512, 5),
            (16384, 768),
            (8191, 2304),
        ]
    };
    for &(rows, c) in shapes {
        bias_grad_case::<f32>(&dev, &mut rng, rows, c);
        bias_grad_case::<bf16>(&dev, &mut rng, rows, c);
        bias_grad_case::<f16>(&dev, &mut rng, rows, c);
    }
    // Wrong dbias length is refused.
    let dy = dev.htod(&[bf16::ONE; 6]).unwrap();
    let mut db: DeviceBuffer<f32> = dev.htod(&[0f32; 2]).unwrap();
    assert!(dev.bias_grad(&dy, 2, 3, &mut db).is_err());
    assert!(colsum::colsum_for(lathe_kernels::Elem::U32).is_none());
}

fn heads_case<T: DeviceElem + Float>(dev: &Device, rng: &mut Rng, s: Heads) {
    let what = format!("heads {} {s:?}", T::ELEM.name());
    let nan = || T::from_f32(f32::NAN);
    // Split: packed -> parts.
    let packed: Vec<T> = random(rng, s.packed_len());
    let d_packed = dev.htod(&packed).unwrap();
    let mut outs: Vec<DeviceBuffer<T>> = (0..s.parts)
        .map(|_| dev.htod(&vec![nan(); s.head_len()]).unwrap())
        .collect();
    {
        let mut refs: Vec<&mut DeviceBuffer<T>> = outs.iter_mut().collect();
        dev.heads_split(&s, &d_packed, &mut refs)
            .unwrap_or_else(|e| panic!("{what}: split: {e}"));
    }
    let mut want: Vec<Vec<T>> = vec![vec![nan(); s.head_len()]; s.parts];
    {
        let mut refs: Vec<&mut [T]> = want.iter_mut().map(|v| v.as_mut_slice()).collect();
        heads::twin::split(&s, &packed, &mut refs);
    }
    for (p, (d, w)) in outs.iter().zip(&want).enumerate() {
        let got = d.to_vec().unwrap();
        for (i, (g, w)) in got.iter().zip(w).enumerate() {
            assert_eq!(
                g.to_f32().to_bits(),
                w.to_f32().to_bits(),
                "{what}: split part {p} element {i}"
            );
        }
    }
    // Merge: fresh parts -> packed (the backward of the split).
    let parts: Vec<Vec<T>> = (0..s.parts).map(|_| random(rng, s.head_len())).collect();
    let d_parts: Vec<DeviceBuffer<T>> = parts.iter().map(|v| dev.htod(v).unwrap()).collect();
    let mut d_out = dev.htod(&vec![nan(); s.packed_len()]).unwrap();
    let refs: Vec<&DeviceBuffer<T>> = d_parts.iter().collect();
    dev.heads_merge(&s, &refs, &mut d_out)
        .unwrap_or_else(|e| panic!("{what}: merge: {e}"));
    let mut want_packed = vec![nan(); s.packed_len()];
    let prefs: Vec<&[T]> = parts.iter().map(|v| v.as_slice()).collect();
    heads::twin::merge(&s, &prefs, &mut want_packed);
    let got = d_out.to_vec().unwrap();
    for (i, (g, w)) in got.iter().zip(&want_packed).enumerate() {
        assert_eq!(
            g.to_f32().to_bits(),
            w.to_f32().to_bits(),
            "{what}: merge element {i}"
        );
    }
}

#[test]
fn heads_split_merge_every_dtype_and_part_count() {
    let dev = test_device("heads_split_merge_every_dtype_and_part_count");
    let mut rng = Rng::new(0x5E6);
    let mut shapes = vec![(2, 5, 3, 7), (1, 33, 2, 13), (3, 1, 1, 1)];
    if !dev.is_sim() {
        shapes.push((4, 1024, 12, 64));
    }
    for (b, t, nh, hs) in shapes {
        for parts in [3, 1] {
            let s = Heads {
                b,
                t,
                nh,
                hs,
                parts,
            };
            heads_case::<f32>(&dev, &mut rng, s);
            heads_case::<bf16>(&dev, &mut rng, s);
            heads_case::<f16>(&dev, &mut rng, s);
        }
    }
    // Wrong part counts and lengths are refused.
    let s = Heads {
        b: 1,
        t: 2,
        nh: 1,
        hs: 2,
        parts: 3,
    };
    let packed = dev.htod(&vec![0f32; s.packed_len()]).unwrap();
    let mut one = dev.htod(&vec![0f32; s.head_len()]).unwrap();
    assert!(dev.heads_split(&s, &packed, &mut [&mut one]).is_err());
    let s2 = Heads {
        parts: 1,
        t: 3,
        ..s
    };
    assert!(dev.heads_split(&s2, &packed, &mut [&mut one]).is_err());
}
