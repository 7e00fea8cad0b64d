//! The GEMM kernels against their CPU twin on the GPU: every version x storage (NN, NT, TN, TT)
//! x operand/output types x epilogue, at ragged shapes and a GPT-2-sized one. Inputs are fresh
//! random values (never zeros); C is poisoned with NaN unless the epilogue reads it; the
//! padding between rows (leading dimension > row length) and before an offset pointer is NaN
//! too and must stay untouched. Tolerance: `tolerance::rel_tolerance` of the operand type.
//! Skips without a GPU; fails instead with `LATHE_REQUIRE_GPU=1`.

use half::{bf16, f16};
use lathe_host::testing::test_device;
use lathe_host::{Device, DeviceElem, KernelArg};
use lathe_kernels::elementwise::twin::Float;
use lathe_kernels::gemm::{Gemm, Linear, Op, Version, kernel_for, twin};
use lathe_kernels::rng::Rng;
use lathe_kernels::tolerance::{check_close, rel_tolerance};

const OPS: [(Op, Op); 4] = [
    (Op::N, Op::N),
    (Op::N, Op::T),
    (Op::T, Op::N),
    (Op::T, Op::T),
];

/// (m, n, k): tiny, ragged on every axis (K not a multiple of 16), and several tiles.
const SHAPES: [(usize, usize, usize); 4] =
    [(1, 1, 1), (17, 33, 65), (127, 129, 31), (257, 511, 100)];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Epilogue {
    Plain,
    Bias,
    BiasGelu,
    /// beta = 1 into a random C (gradient accumulation).
    Accumulate,
    /// alpha = -0.5, beta = 0.25, bias.
    Scaled,
}
const EPILOGUES: [Epilogue; 5] = [
    Epilogue::Plain,
    Epilogue::Bias,
    Epilogue::BiasGelu,
    Epilogue::Accumulate,
    Epilogue::Scaled,
];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Storage {
    /// Leading dimension = row length (odd shapes leave the 16-byte path).
    Contiguous,
    /// Leading dimensions rounded up to a multiple of 8, plus 8: the 16-byte path with tails.
    Padded,
    /// Pointers one element into their buffers and odd leading dimensions: the element path
    /// and scalar stores of C.
    Offset,
}
const STORAGES: [Storage; 3] = [Storage::Contiguous, Storage::Padded, Storage::Offset];

struct Case {
    version: Version,
    g: Gemm,
    epilogue: Epilogue,
    storage: Storage,
    /// Rows of C compared with the twin (all rows are checked for being written).
    row_step: usize,
}

/// A host image of a stored matrix: `off` NaN elements, then `rows` rows of `ld` elements with
/// random values in the first `cols` and NaN after.
fn matrix<T: Float>(rng: &mut Rng, rows: usize, cols: usize, ld: usize, off: usize) -> Vec<T> {
    let mut v = vec![T::from_f32(f32::NAN); off + rows * ld + 1];
    for r in 0..rows {
        for c in 0..cols {
            v[off + r * ld + c] = T::from_f32(rng.range_f32(-1.0, 1.0));
        }
    }
    v
}

fn ptr<T: DeviceElem>(
    b: &mut lathe_host::DeviceBuffer<T>,
    off: usize,
    writable: bool,
) -> KernelArg {
    KernelArg::Ptr {
        addr: b.addr() + (off * size_of::<T>()) as u64,
        elem: T::ELEM,
        len: b.len() - off,
        writable,
    }
}

fn run<I, O>(dev: &Device, rng: &mut Rng, c: &Case)
where
    I: DeviceElem + Float,
    O: DeviceElem + Float,
{
    let mut g = c.g;
    match c.epilogue {
        Epilogue::BiasGelu => g = g.with_gelu(true),
        Epilogue::Accumulate => g = g.with_beta(1.0),
        Epilogue::Scaled => g = g.with_alpha(-0.5).with_beta(0.25),
        _ => {}
    }
    let bias = matches!(
        c.epilogue,
        Epilogue::Bias | Epilogue::BiasGelu | Epilogue::Scaled
    );
    let ((ar, ac), (br, bc)) = (g.a_stored(), g.b_stored());
    let off = if c.storage == Storage::Offset { 1 } else { 0 };
    g = match c.storage {
        Storage::Contiguous => g,
        Storage::Padded => {
            let up = |x: usize| x.div_ceil(8) * 8 + 8;
            g.with_ld(up(ac), up(bc), up(g.n))
        }
        Storage::Offset => g.with_ld(ac + 1, bc + 3, g.n + 1),
    };
    let a: Vec<I> = matrix(rng, ar, ac, g.lda(), off);
    let b: Vec<I> = matrix(rng, br, bc, g.ldb(), off);
    let bias_v: Vec<I> = matrix(rng, 1, g.n, g.n, 0);
    let c0: Vec<O> = if g.beta != 0.0 {
        matrix(rng, g.m, g.n, g.ldc(), off)
    } else {
        vec![O::from_f32(f32::NAN); off + g.m * g.ldc() + 1]
    };
    let mut da = dev.htod(&a).expect("upload A");
    let mut db = dev.htod(&b).expect("upload B");
    let mut dbias = dev.htod(&bias_v).expect("upload bias");
    let mut dc = dev.htod(&c0).expect("upload C");
    let k = kernel_for(c.version, g.op_a, g.op_b, I::ELEM, O::ELEM).expect("kernel");
    let u = |x: usize| KernelArg::U32(x as u32);
    let args = [
        ptr(&mut da, off, false),
        ptr(&mut db, off, false),
        ptr(&mut dc, off, true),
        if bias {
            ptr(&mut dbias, 0, false)
        } else {
            KernelArg::Ptr {
                addr: 0,
                elem: I::ELEM,
                len: 0,
                writable: false,
            }
        },
        u(g.m),
        u(g.n),
        u(g.k),
        u(g.lda()),
        u(g.ldb()),
        u(g.ldc()),
        KernelArg::F32(g.alpha),
        KernelArg::F32(g.beta),
        KernelArg::U32(g.flags(bias)),
    ];
    let what = format!(
        "{} {}x{}x{} {:?} {:?} (lda {}, ldb {}, ldc {})",
        k.entry,
        g.m,
        g.n,
        g.k,
        c.epilogue,
        c.storage,
        g.lda(),
        g.ldb(),
        g.ldc()
    );
    dev.launch(k, &g.problem(), &args, dev.compute_stream())
        .unwrap_or_else(|e| panic!("{what}: launch: {e}"));
    let out = dc.to_vec().unwrap_or_else(|e| panic!("{what}: {e}"));

    // Every element of the m x n block written; everything else untouched.
    let at = |r: usize, col: usize| off + r * g.ldc() + col;
    for (i, (&o, &before)) in out.iter().zip(&c0).enumerate() {
        let inside = i >= off && (i - off) % g.ldc() < g.n && (i - off) / g.ldc() < g.m;
        if inside {
            assert!(
                o.to_f32().is_finite(),
                "{what}: C element {i} is {}",
                o.to_f32()
            );
        } else {
            assert_eq!(
                o.to_f32().to_bits(),
                before.to_f32().to_bits(),
                "{what}: C element {i} outside the m x n block changed"
            );
        }
    }
    // The twin on every `row_step`-th row and the last row.
    let mut rows: Vec<usize> = (0..g.m).step_by(c.row_step).collect();
    if rows.last() != Some(&(g.m - 1)) {
        rows.push(g.m - 1);
    }
    let want = twin::reference(
        &g,
        &a[off..],
        &b[off..],
        bias.then_some(&bias_v[..]),
        &c0[off..],
        &rows,
    );
    let got: Vec<f64> = rows
        .iter()
        .flat_map(|&r| (0..g.n).map(move |col| (r, col)))
        .map(|(r, col)| out[at(r, col)].to_f32() as f64)
        .collect();
    check_close(&what, &got, &want, rel_tolerance(I::ELEM)).unwrap_or_else(|e| panic!("{e}"));
}

/// Every storage, output type, shape and epilogue for one version and operand type; the
/// storage mode rotates with the epilogue so every pair meets across the shapes.
fn sweep<I: DeviceElem + Float>(dev: &Device, version: Version, seed: u64) {
    let mut rng = Rng::new(seed);
    for (s, &(m, n, k)) in SHAPES.iter().enumerate() {
        for (a, b) in OPS {
            for (e, &epilogue) in EPILOGUES.iter().enumerate() {
                let case = Case {
                    version,
                    g: Gemm::new(m, n, k).with_ops(a, b),
                    epilogue,
                    storage: STORAGES[(s + e) % STORAGES.len()],
                    row_step: 1,
                };
                run::<I, I>(dev, &mut rng, &case);
                run::<I, f32>(dev, &mut rng, &case);
            }
        }
    }
}

#[test]
fn gemm_v1_bf16_every_layout_epilogue_and_shape() {
    let dev = test_device("gemm_v1_bf16_every_layout_epilogue_and_shape");
    sweep::<bf16>(&dev, Version::V1, 0x6E1);
}

#[test]
fn gemm_v1_f16_every_layout_epilogue_and_shape() {
    let dev = test_device("gemm_v1_f16_every_layout_epilogue_and_shape");
    sweep::<f16>(&dev, Version::V1, 0x6E2);
}

#[test]
fn gemm_v2_bf16_every_layout_epilogue_and_shape() {
    let dev = test_device("gemm_v2_bf16_every_layout_epilogue_and_shape");
    sweep::<bf16>(&dev, Version::V2, 0x6E3);
}

#[test]
fn gemm_v2_f16_every_layout_epilogue_and_shape() {
    let dev = test_device("gemm_v2_f16_every_layout_epilogue_and_shape");
    sweep::<f16>(&dev, Version::V2, 0x6E4);
}

#[test]
fn gemm_gpt2_sized_every_layout() {
    let dev = test_device("gemm_gpt2_sized_every_layout");
    let mut rng = Rng::new(0x6E5);
    // The simulated device interprets every instruction: 64 rows there, 512 on a GPU.
    let rows = if dev.is_sim() { 64 } else { 512 };
    for version in Version::ALL {
        for (i, (a, b)) in OPS.into_iter().enumerate() {
            // GPT-2's QKV projection: (M, K, N) = (rows, 768, 2304).
            let case = Case {
                version,
                g: Gemm::new(rows, 2304, 768).with_ops(a, b),
                epilogue: EPILOGUES[i % EPILOGUES.len()],
                storage: Storage::Contiguous,
                row_step: 16,
            };
            run::<bf16, bf16>(&dev, &mut rng, &case);
            run::<f16, f32>(&dev, &mut rng, &case);
        }
    }
}

#[test]
fn linear_layer_training_products_through_the_typed_api() {
    let dev = test_device("linear_layer_training_products_through_the_typed_api");
    let mut rng = Rng::new(0x6E6);
    let l = Linear {
        rows: 300,
        inputs: 200,
        outputs: 264,
    };
    let x: Vec<bf16> = matrix(&mut rng, l.rows, l.inputs, l.inputs, 0);
    let w: Vec<bf16> = matrix(&mut rng, l.inputs, l.outputs, l.outputs, 0);
    let bias: Vec<bf16> = matrix(&mut rng, 1, l.outputs, l.outputs, 0);
    let dy: Vec<bf16> = matrix(&mut rng, l.rows, l.outputs, l.outputs, 0);
    let (dx_, dw_, db_, ddy) = (
        dev.htod(&x).unwrap(),
        dev.htod(&w).unwrap(),
        dev.htod(&bias).unwrap(),
        dev.htod(&dy).unwrap(),
    );
    let tol = rel_tolerance(lathe_kernels::Elem::BF16);
    let all = |m: usize| (0..m).collect::<Vec<_>>();
    let nan = |n: usize| vec![bf16::from_f32(f32::NAN); n];

    // Forward with bias and GELU.
    let mut y = dev.htod(&nan(l.rows * l.outputs + 1)).unwrap();
    dev.linear_forward(l, &dx_, &dw_, Some(&db_), true, &mut y)
        .unwrap();
    let g = l.forward().with_gelu(true);
    let want = twin::reference(&g, &x, &w, Some(&bias), &nan(0), &all(l.rows));
    let got: Vec<f64> = y.to_vec().unwrap()[..l.rows * l.outputs]
        .iter()
        .map(|v| v.to_f64())
        .collect();
    check_close("linear_forward", &got, &want, tol).unwrap();

    // Input gradient.
    let mut dx = dev.htod(&nan(l.rows * l.inputs + 1)).unwrap();
    dev.linear_backward_input(l, &ddy, &dw_, &mut dx).unwrap();
    let want = twin::reference(&l.backward_input(), &dy, &w, None, &nan(0), &all(l.rows));
    let got: Vec<f64> = dx.to_vec().unwrap()[..l.rows * l.inputs]
        .iter()
        .map(|v| v.to_f64())
        .collect();
    check_close("linear_backward_input", &got, &want, tol).unwrap();

    // Weight gradient, written then accumulated: the second call doubles it.
    let mut dw = dev.htod(&vec![f32::NAN; l.inputs * l.outputs]).unwrap();
    dev.linear_backward_weight(l, &dx_, &ddy, false, &mut dw)
        .unwrap();
    let once = dw.to_vec().unwrap();
    let want = twin::reference(
        &l.backward_weight(false),
        &x,
        &dy,
        None,
        &[0f32; 0],
        &all(l.inputs),
    );
    let got: Vec<f64> = once.iter().map(|&v| v as f64).collect();
    check_close("linear_backward_weight", &got, &want, tol).unwrap();
    dev.linear_backward_weight(l, &dx_, &ddy, true, &mut dw)
        .unwrap();
    let twice: Vec<f64> = dw.to_vec().unwrap().iter().map(|&v| v as f64).collect();
    let doubled: Vec<f64> = want.iter().map(|v| 2.0 * v).collect();
    check_close("linear_backward_weight accumulate", &twice, &doubled, tol).unwrap();

    // Deterministic: the same launch gives the same bits.
    dev.linear_backward_weight(l, &dx_, &ddy, false, &mut dw)
        .unwrap();
    let again = dw.to_vec().unwrap();
    assert!(
        once.iter()
            .zip(&again)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "weight gradient not bit-identical across runs"
    );
}

#[test]
fn gemm_rejects_bad_problems_with_clear_errors() {
    let dev = test_device("gemm_rejects_bad_problems_with_clear_errors");
    let mut rng = Rng::new(0x6E7);
    let six = |rng: &mut Rng| -> Vec<bf16> {
        (0..6)
            .map(|_| bf16::from_f32(rng.range_f32(-1.0, 1.0)))
            .collect()
    };
    let a = dev.htod(&six(&mut rng)).unwrap();
    let b = dev.htod(&six(&mut rng)).unwrap();
    let mut c = dev.alloc::<f32>(4).unwrap();
    // A is 2 x 3: fine; a 3 x 3 A does not fit in 6 elements.
    dev.gemm(&Gemm::new(2, 2, 3), &a, &b, None, &mut c).unwrap();
    let e = dev
        .gemm(&Gemm::new(3, 1, 3), &a, &b, None, &mut c)
        .unwrap_err();
    assert!(e.to_string().contains("A holds 6 elements"), "{e}");
    let e = dev
        .gemm(&Gemm::new(2, 2, 3).with_ld(2, 2, 2), &a, &b, None, &mut c)
        .unwrap_err();
    assert!(e.to_string().contains("lda = 2"), "{e}");
    let short_bias = dev.alloc::<bf16>(1).unwrap();
    let e = dev
        .gemm(&Gemm::new(2, 2, 3), &a, &b, Some(&short_bias), &mut c)
        .unwrap_err();
    assert!(e.to_string().contains("bias holds 1"), "{e}");
    let mut c16 = dev.alloc::<f16>(4).unwrap();
    let e = dev
        .gemm(&Gemm::new(2, 2, 3), &a, &b, None, &mut c16)
        .unwrap_err();
    assert!(e.to_string().contains("no kernel"), "{e}");
    // Empty products are no-ops.
    dev.gemm(&Gemm::new(0, 2, 3), &a, &b, None, &mut c).unwrap();
}

/// One product on the Hopper (version 3) kernel through [`Device::hopper_gemm`], against the
/// twin: every row compared, every element of C inside `m x n` written, the padding after
/// each row of C untouched.
fn run_hopper<I, O>(dev: &Device, rng: &mut Rng, g: Gemm, epilogue: Epilogue)
where
    I: DeviceElem + Float,
    O: DeviceElem + Float,
{
    let mut g = g;
    match epilogue {
        Epilogue::BiasGelu => g = g.with_gelu(true),
        Epilogue::Accumulate => g = g.with_beta(1.0),
        Epilogue::Scaled => g = g.with_alpha(-0.5).with_beta(0.25),
        _ => {}
    }
    let bias = matches!(
        epilogue,
        Epilogue::Bias | Epilogue::BiasGelu | Epilogue::Scaled
    );
    let ((ar, ac), (br, bc)) = (g.a_stored(), g.b_stored());
    // TMA: leading dimensions a multiple of 8 elements; C gets one padding column.
    let up = |x: usize| x.div_ceil(8) * 8;
    g = g.with_ld(up(ac), up(bc), g.n + 1);
    let a: Vec<I> = matrix(rng, ar, ac, g.lda(), 0);
    let b: Vec<I> = matrix(rng, br, bc, g.ldb(), 0);
    let bias_v: Vec<I> = matrix(rng, 1, g.n, g.n, 0);
    let c0: Vec<O> = if g.beta != 0.0 {
        matrix(rng, g.m, g.n, g.ldc(), 0)
    } else {
        vec![O::from_f32(f32::NAN); g.m * g.ldc() + 1]
    };
    let da = dev.htod(&a).expect("upload A");
    let db = dev.htod(&b).expect("upload B");
    let dbias = dev.htod(&bias_v).expect("upload bias");
    let mut dc = dev.htod(&c0).expect("upload C");
    let what = format!(
        "hopper v3 {:?}{:?} {}->{} {}x{}x{} {epilogue:?}",
        g.op_a,
        g.op_b,
        I::ELEM.name(),
        O::ELEM.name(),
        g.m,
        g.n,
        g.k
    );
    dev.hopper_gemm(
        dev.compute_stream(),
        &g,
        &da,
        &db,
        bias.then_some(&dbias),
        &mut dc,
    )
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    let out = dc.to_vec().unwrap();
    for (i, (&o, &before)) in out.iter().zip(&c0).enumerate() {
        let inside = i % g.ldc() < g.n && i / g.ldc() < g.m;
        if inside {
            assert!(o.to_f32().is_finite(), "{what}: C element {i} unwritten");
        } else {
            assert_eq!(
                o.to_f32().to_bits(),
                before.to_f32().to_bits(),
                "{what}: {i}"
            );
        }
    }
    let rows: Vec<usize> = (0..g.m).collect();
    let want = twin::reference(&g, &a, &b, bias.then_some(&bias_v[..]), &c0, &rows);
    let got: Vec<f64> = rows
        .iter()
        .flat_map(|&r| (0..g.n).map(move |col| (r, col)))
        .map(|(r, col)| out[r * g.ldc() + col].to_f32() as f64)
        .collect();
    check_close(&what, &got, &want, rel_tolerance(I::ELEM)).unwrap_or_else(|e| panic!("{e}"));
}

/// The Hopper kernels (wgmma + TMA, sm_90a) for the three training layouts — forward `N T`
/// (both operands K-major), input gradient `N N` (B N-major), weight gradient `T N` (both
/// MN-major) — with bf16 and f16 operands, outputs of the operand type and f32, every
/// epilogue, at shapes with tails on every axis (partly out-of-bounds TMA boxes, boxes taller
/// than the tensor) and more tiles than one CTA walks. Runs where the device has compute
/// capability 9.0 (the simulated device does).
#[test]
fn hopper_gemm_every_training_layout() {
    let dev = test_device("hopper_gemm_every_training_layout");
    if dev.compute_capability() != (9, 0) {
        eprintln!("skipped: the Hopper kernels need compute capability 9.0");
        return;
    }
    let mut rng = Rng::new(0x6E7);
    let layouts = [(Op::N, Op::T), (Op::N, Op::N), (Op::T, Op::N)];
    // K 37: a K tail inside one 64-wide box (zero-filled past K, leading dimension 40).
    let shapes = [(130, 260, 72), (40, 24, 8), (257, 96, 200), (70, 300, 37)];
    for (l, &(a, b)) in layouts.iter().enumerate() {
        for (s, &(m, n, k)) in shapes.iter().enumerate() {
            let g = Gemm::new(m, n, k).with_ops(a, b);
            let e = |i: usize| EPILOGUES[(l + s + i) % EPILOGUES.len()];
            run_hopper::<bf16, bf16>(&dev, &mut rng, g, e(0));
            run_hopper::<bf16, f32>(&dev, &mut rng, g, e(1));
            run_hopper::<f16, f16>(&dev, &mut rng, g, e(2));
            run_hopper::<f16, f32>(&dev, &mut rng, g, e(3));
        }
    }
    // What the kernels do not take is an error naming why, not a launch.
    let x = dev.htod(&vec![bf16::ONE; 64 * 12]).unwrap();
    let mut y = dev.alloc::<f32>(64 * 64).unwrap();
    let g = Gemm::new(64, 64, 12).with_ops(Op::N, Op::T);
    let e = dev
        .hopper_gemm(dev.compute_stream(), &g, &x, &x, None, &mut y)
        .unwrap_err();
    assert!(e.to_string().contains("multiples of 8"), "{e}");
    let g = Gemm::new(64, 64, 16).with_ops(Op::T, Op::T);
    assert!(
        dev.hopper_gemm(dev.compute_stream(), &g, &x, &x, None, &mut y)
            .is_err()
    );
}

/// `Device::gemm` takes the Hopper kernel for products with a full 128 x 256 tile of outputs
/// on a compute capability 9.0 device and the `mma.sync` kernels below that, with the same
/// results within the tolerance.
#[test]
fn gemm_dispatch_picks_hopper_for_large_products() {
    let dev = test_device("gemm_dispatch_picks_hopper_for_large_products");
    let big = Gemm::new(256, 384, 64).with_ops(Op::N, Op::N);
    let small = Gemm::new(64, 96, 64).with_ops(Op::N, Op::N);
    let hopper = dev.compute_capability() == (9, 0);
    let allowed = std::env::var("LATHE_GEMM").map_or(true, |v| v != "mma");
    assert_eq!(
        dev.gemm_takes_hopper::<bf16, f32>(&big, 0, 0),
        hopper && allowed
    );
    assert!(!dev.gemm_takes_hopper::<bf16, f32>(&small, 0, 0));
    // Misaligned operands or odd leading dimensions stay on mma.sync.
    assert!(!dev.gemm_takes_hopper::<bf16, f32>(&big, 8, 0));
    assert!(!dev.gemm_takes_hopper::<bf16, f32>(&big.with_ld(65, 384, 384), 0, 0));
    let mut rng = Rng::new(0x6E8);
    let a: Vec<bf16> = matrix(&mut rng, 256, 64, 64, 0);
    let b: Vec<bf16> = matrix(&mut rng, 64, 384, 384, 0);
    let (da, db) = (dev.htod(&a).unwrap(), dev.htod(&b).unwrap());
    let mut via_gemm = dev.htod(&vec![f32::NAN; 256 * 384]).unwrap();
    dev.gemm(&big, &da, &db, None, &mut via_gemm).unwrap();
    let mut via_mma = dev.htod(&vec![f32::NAN; 256 * 384]).unwrap();
    dev.gemm_with(
        Version::SHIPPED,
        dev.compute_stream(),
        &big,
        &da,
        &db,
        None,
        &mut via_mma,
    )
    .unwrap();
    let f = |v: Vec<f32>| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    check_close(
        "gemm dispatch vs mma.sync",
        &f(via_gemm.to_vec().unwrap()),
        &f(via_mma.to_vec().unwrap()),
        1e-5,
    )
    .unwrap();
}
