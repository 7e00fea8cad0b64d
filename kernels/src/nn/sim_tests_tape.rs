//! Simulator tests of the tape kernels (cross-entropy with a saved logsumexp, the tape's
//! pointwise kernels, the row gather, the layout copies); see `sim_tests` for the method:
//! random non-zero inputs, NaN-poisoned outputs, awkward shapes, aligned and misaligned
//! pointers, the sanitizer on for every launch.

use super::*;
use crate::desc::{Elem, Problem};
use crate::elementwise::twin::Float;
use crate::rng::Rng;
use crate::simtest::{Arg, Gpu};
use crate::tolerance::{check_close, rel_tolerance};
use half::{bf16, f16};

fn random<T: Float>(rng: &mut Rng, n: usize, lo: f32, hi: f32) -> Vec<T> {
    (0..n).map(|_| T::from_f32(rng.range_f32(lo, hi))).collect()
}

fn f64s<T: Float>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f32() as f64).collect()
}

fn bits<T: bytemuck::Pod>(v: &[T]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

fn size<T>() -> u64 {
    std::mem::size_of::<T>() as u64
}

fn xent_case<T: Float + bytemuck::Pod>(e: Elem, rows: usize, vp: usize, v: usize, shift: usize) {
    let ign = u32::MAX;
    let mut rng = Rng::new((rows * 1000 + vp * 7 + v + shift) as u64);
    let logits: Vec<T> = random(&mut rng, rows * vp + shift, -4.0, 4.0);
    let targets: Vec<u32> = (0..rows)
        .map(|r| match r % 5 {
            1 => ign,
            2 => (v - 1) as u32,
            _ => rng.below(v as u64) as u32,
        })
        .collect();
    let sh = shift as u64 * size::<T>();
    let (factor, gscale) = (0.125f32, [3.0f32, 7.0]);
    let p = Problem {
        batch: rows as u64,
        n: vp as u64,
        k: v as u64,
        m: 1,
    };
    let mut gpu = Gpu::new();
    let dl = gpu.upload(&logits);
    let dt = gpu.upload(&targets);
    let (dloss, dlse) = (gpu.alloc_bytes(4 * rows), gpu.alloc_bytes(4 * rows));
    let fwd = [
        Arg::Ptr(dl + sh),
        Arg::Ptr(dt),
        Arg::Ptr(dloss),
        Arg::Ptr(dlse),
        Arg::U32(rows as u32),
        Arg::U32(vp as u32),
        Arg::U32(v as u32),
        Arg::U32(ign),
    ];
    gpu.launch(xent::forward_for(e).unwrap(), &p, &fwd).unwrap();
    let (loss, lse) = (gpu.read::<f32>(dloss, rows), gpu.read::<f32>(dlse, rows));
    let (mut want_loss, mut want_lse) = (vec![0f32; rows], vec![0f32; rows]);
    xent::twin::forward(
        &logits[shift..],
        &targets,
        &mut want_loss,
        &mut want_lse,
        vp,
        v,
        ign,
    );
    let what = format!("xent {e:?} rows={rows} vp={vp} v={v} shift={shift}");
    check_close(&format!("{what} lse"), &f64s(&lse), &f64s(&want_lse), 1e-5).unwrap();
    check_close(
        &format!("{what} loss"),
        &f64s(&loss),
        &f64s(&want_loss),
        1e-5,
    )
    .unwrap();
    for (r, &t) in targets.iter().enumerate() {
        if t == ign {
            assert_eq!(loss[r], 0.0, "{what}: ignored row {r}");
        }
    }
    // Backward from the device's lse, the loss gradient read at gscale[1].
    let dg = gpu.upload(&gscale);
    let dd = gpu.alloc_bytes((rows * vp + shift) * size::<T>() as usize);
    let bwd = [
        Arg::Ptr(dl + sh),
        Arg::Ptr(dlse),
        Arg::Ptr(dt),
        Arg::Ptr(dg + 4),
        Arg::Ptr(dd + sh),
        Arg::U32(rows as u32),
        Arg::U32(vp as u32),
        Arg::U32(v as u32),
        Arg::U32(ign),
        Arg::F32(factor),
    ];
    gpu.launch(xent::backward_for(e).unwrap(), &p, &bwd)
        .unwrap();
    let grad = gpu.read::<T>(dd + sh, rows * vp);
    let mut want = vec![T::from_f32(0.0); rows * vp];
    xent::twin::backward(
        &logits[shift..],
        &lse,
        &targets,
        gscale[1] * factor,
        &mut want,
        vp,
        v,
        ign,
    );
    check_close(
        &format!("{what} dlogits"),
        &f64s(&grad),
        &f64s(&want),
        rel_tolerance(e).max(1e-5),
    )
    .unwrap();
    for (r, &t) in targets.iter().enumerate() {
        let row = &grad[r * vp..(r + 1) * vp];
        if t == ign {
            assert!(row.iter().all(|x| x.to_f32() == 0.0), "{what}: row {r}");
        }
        assert!(
            row[v..].iter().all(|x| x.to_f32() == 0.0),
            "{what}: padding"
        );
    }
}

#[test]
fn xent_forward_and_backward_match_twins() {
    xent_case::<f32>(Elem::F32, 1, 7, 7, 0);
    xent_case::<f32>(Elem::F32, 7, 68, 61, 0);
    xent_case::<f32>(Elem::F32, 6, 67, 60, 1);
    xent_case::<f32>(Elem::F32, 3, 1031, 1029, 0);
    xent_case::<bf16>(Elem::BF16, 5, 516, 513, 0);
    xent_case::<bf16>(Elem::BF16, 4, 33, 33, 3);
    xent_case::<f16>(Elem::F16, 5, 40, 33, 1);
    xent_case::<f16>(Elem::F16, 6, 300, 257, 0);
}

#[test]
fn xent_invalid_target_poisons_its_row() {
    let (rows, vp, v) = (2usize, 12usize, 10usize);
    let mut rng = Rng::new(3);
    let logits = rng.vec_f32(rows * vp, -2.0, 2.0);
    let targets = [v as u32, 4];
    let mut gpu = Gpu::new();
    let (dl, dt) = (gpu.upload(&logits), gpu.upload(&targets));
    let (dloss, dlse) = (gpu.alloc_bytes(4 * rows), gpu.alloc_bytes(4 * rows));
    let p = Problem {
        batch: rows as u64,
        n: vp as u64,
        k: v as u64,
        m: 1,
    };
    let args = [
        Arg::Ptr(dl),
        Arg::Ptr(dt),
        Arg::Ptr(dloss),
        Arg::Ptr(dlse),
        Arg::U32(rows as u32),
        Arg::U32(vp as u32),
        Arg::U32(v as u32),
        Arg::U32(u32::MAX),
    ];
    gpu.launch(&xent::XENT_FWD_F32, &p, &args).unwrap();
    let loss = gpu.read::<f32>(dloss, rows);
    assert!(loss[0].is_nan() && loss[1].is_finite(), "{loss:?}");
    let dg = gpu.upload(&[1.0f32]);
    let dd = gpu.alloc_bytes(4 * rows * vp);
    let args = [
        Arg::Ptr(dl),
        Arg::Ptr(dlse),
        Arg::Ptr(dt),
        Arg::Ptr(dg),
        Arg::Ptr(dd),
        Arg::U32(rows as u32),
        Arg::U32(vp as u32),
        Arg::U32(v as u32),
        Arg::U32(u32::MAX),
        Arg::F32(1.0),
    ];
    gpu.launch(&xent::XENT_BWD_F32, &p, &args).unwrap();
    let d = gpu.read::<f32>(dd, rows * vp);
    assert!(d[..vp].iter().all(|x| x.is_nan()));
    assert!(d[vp..].iter().all(|x| x.is_finite()));
}

fn pointwise_case<T: Float + bytemuck::Pod>(e: Elem, n: usize, shift: usize) {
    use tape_pointwise::*;
    let mut rng = Rng::new(n as u64 * 3 + shift as u64);
    let a: Vec<T> = random(&mut rng, n + shift, -3.0, 3.0);
    let b: Vec<T> = random(&mut rng, n + shift, -2.0, 2.0);
    let sh = shift as u64 * size::<T>();
    let bytes = (n + shift) * size::<T>() as usize;
    let p = Problem::elems(n as u64);
    let tol = rel_tolerance(e).max(1e-5);
    let what = format!("{e:?} n={n} shift={shift}");
    let mut gpu = Gpu::new();
    let (da, db) = (gpu.upload(&a), gpu.upload(&b));
    // mul
    let out = gpu.alloc_bytes(bytes);
    let args = [
        Arg::Ptr(da + sh),
        Arg::Ptr(db + sh),
        Arg::Ptr(out + sh),
        Arg::U64(n as u64),
    ];
    gpu.launch(mul_for(e).unwrap(), &p, &args).unwrap();
    let mut want = vec![T::from_f32(0.0); n];
    twin::mul(&a[shift..], &b[shift..], &mut want);
    let got = gpu.read::<T>(out + sh, n);
    check_close(&format!("mul {what}"), &f64s(&got), &f64s(&want), tol).unwrap();
    // relu forward: exact (a selection)
    let y = gpu.alloc_bytes(bytes);
    let args = [Arg::Ptr(da + sh), Arg::Ptr(y + sh), Arg::U64(n as u64)];
    gpu.launch(relu_fwd_for(e).unwrap(), &p, &args).unwrap();
    let mut want_y = vec![T::from_f32(0.0); n];
    twin::relu_fwd(&a[shift..], &mut want_y);
    let got_y = gpu.read::<T>(y + sh, n);
    assert_eq!(bits(&got_y), bits(&want_y), "relu fwd {what}");
    // relu backward: exact
    let dx = gpu.alloc_bytes(bytes);
    let args = [
        Arg::Ptr(y + sh),
        Arg::Ptr(db + sh),
        Arg::Ptr(dx + sh),
        Arg::U64(n as u64),
    ];
    gpu.launch(relu_bwd_for(e).unwrap(), &p, &args).unwrap();
    let mut want_dx = vec![T::from_f32(0.0); n];
    twin::relu_bwd(&want_y, &b[shift..], &mut want_dx);
    assert_eq!(
        bits(&gpu.read::<T>(dx + sh, n)),
        bits(&want_dx),
        "relu bwd {what}"
    );
    // fill from a device scalar (element 1 of a small buffer)
    let src = gpu.upload(&[9.0f32, -1.75, 4.0]);
    let o = gpu.alloc_bytes(bytes);
    let args = [
        Arg::Ptr(src + 4),
        Arg::Ptr(o + sh),
        Arg::U64(n as u64),
        Arg::F32(0.3),
    ];
    gpu.launch(fill_scalar_for(e).unwrap(), &p, &args).unwrap();
    let mut want_f = vec![T::from_f32(0.0); n];
    twin::fill_scalar(-1.75, 0.3, &mut want_f);
    assert_eq!(
        bits(&gpu.read::<T>(o + sh, n)),
        bits(&want_f),
        "fill {what}"
    );
}

#[test]
fn tape_pointwise_kernels_match_twins() {
    for &(n, shift) in &[(1usize, 0usize), (3, 1), (31, 0), (257, 1), (1029, 0)] {
        pointwise_case::<f32>(Elem::F32, n, shift);
        pointwise_case::<bf16>(Elem::BF16, n, shift);
        pointwise_case::<f16>(Elem::F16, n, shift);
    }
}

#[test]
fn fill_scalar_strides_past_the_block_cap() {
    // More elements than the capped grid covers in one step: the grid-stride loop goes on.
    let n = 256 * 8192 + 13;
    let mut gpu = Gpu::new();
    let src = gpu.upload(&[2.5f32]);
    let o = gpu.alloc_bytes(2 * n);
    let args = [
        Arg::Ptr(src),
        Arg::Ptr(o),
        Arg::U64(n as u64),
        Arg::F32(-2.0),
    ];
    let g = (tape_pointwise::FILL_SCALAR_BF16.geometry)(&Problem::elems(n as u64));
    assert_eq!(g.grid.0, 8192);
    gpu.launch(
        &tape_pointwise::FILL_SCALAR_BF16,
        &Problem::elems(n as u64),
        &args,
    )
    .unwrap();
    let got = gpu.read::<bf16>(o, n);
    assert!(got.iter().all(|&x| x == bf16::from_f32(-5.0)));
}

fn add_into_case<X: Float + bytemuck::Pod, Y: Float + bytemuck::Pod>(
    ex: Elem,
    ey: Elem,
    n: usize,
    shift: usize,
) {
    let mut rng = Rng::new(n as u64 + 77);
    let x: Vec<X> = random(&mut rng, n + shift, -3.0, 3.0);
    let y: Vec<Y> = random(&mut rng, n + shift, -3.0, 3.0);
    let mut gpu = Gpu::new();
    let (dx, dy) = (gpu.upload(&x), gpu.upload(&y));
    let args = [
        Arg::Ptr(dx + shift as u64 * size::<X>()),
        Arg::Ptr(dy + shift as u64 * size::<Y>()),
        Arg::U64(n as u64),
    ];
    let k = tape_pointwise::add_into_for(ex, ey).unwrap();
    gpu.launch(k, &Problem::elems(n as u64), &args).unwrap();
    let got = gpu.read::<Y>(dy, n + shift);
    let mut want = y.clone();
    tape_pointwise::twin::add_into(&x[shift..], &mut want[shift..]);
    // f32 math and one rounding on both sides: the same bits.
    assert_eq!(
        bits(&got),
        bits(&want),
        "add_into {ex:?} -> {ey:?} n={n} shift={shift}"
    );
}

#[test]
fn add_into_every_dtype_pair_matches_twin() {
    for &(n, shift) in &[(1usize, 0usize), (5, 1), (259, 0), (1030, 3)] {
        add_into_case::<f32, f32>(Elem::F32, Elem::F32, n, shift);
        add_into_case::<f32, bf16>(Elem::F32, Elem::BF16, n, shift);
        add_into_case::<f32, f16>(Elem::F32, Elem::F16, n, shift);
        add_into_case::<bf16, f32>(Elem::BF16, Elem::F32, n, shift);
        add_into_case::<bf16, bf16>(Elem::BF16, Elem::BF16, n, shift);
        add_into_case::<bf16, f16>(Elem::BF16, Elem::F16, n, shift);
        add_into_case::<f16, f32>(Elem::F16, Elem::F32, n, shift);
        add_into_case::<f16, bf16>(Elem::F16, Elem::BF16, n, shift);
        add_into_case::<f16, f16>(Elem::F16, Elem::F16, n, shift);
    }
}

fn gather_case<T: Float + bytemuck::Pod>(e: Elem, n: usize, rows: usize, c: usize) {
    let mut rng = Rng::new((n * 31 + rows * 7 + c) as u64);
    let table: Vec<T> = random(&mut rng, rows * c, -2.0, 2.0);
    let mut ids: Vec<u32> = (0..n).map(|_| rng.below(rows as u64) as u32).collect();
    ids[n / 2] = rows as u32; // invalid: NaN row
    if n > 2 {
        ids[n - 1] = u32::MAX;
    }
    let mut gpu = Gpu::new();
    let (di, dt) = (gpu.upload(&ids), gpu.upload(&table));
    let out = gpu.alloc_bytes(n * c * size::<T>() as usize);
    let args = [
        Arg::Ptr(di),
        Arg::Ptr(dt),
        Arg::Ptr(out),
        Arg::U32(n as u32),
        Arg::U32(c as u32),
        Arg::U32(rows as u32),
    ];
    let p = Problem {
        batch: n as u64,
        n: c as u64,
        k: rows as u64,
        m: 1,
    };
    gpu.launch(gather::kernel_for(e).unwrap(), &p, &args)
        .unwrap();
    let got = gpu.read::<T>(out, n * c);
    let mut want = vec![T::from_f32(0.0); n * c];
    gather::twin::gather_rows(&ids, &table, &mut want, c);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let (g, w) = (g.to_f32(), w.to_f32());
        assert!(
            g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
            "gather {e:?} n={n} c={c}: element {i} {g} vs {w}"
        );
    }
    assert!(got[(n / 2) * c].to_f32().is_nan());
}

#[test]
fn gather_rows_matches_twin() {
    gather_case::<f32>(Elem::F32, 1, 3, 5);
    gather_case::<f32>(Elem::F32, 9, 17, 300);
    gather_case::<bf16>(Elem::BF16, 7, 4, 257);
    gather_case::<f16>(Elem::F16, 5, 11, 33);
}

fn layout_case<T: Float + bytemuck::Pod>(e: Elem) {
    let mut rng = Rng::new(e.size() as u64 + 5);
    // A 2-D block with leading dimensions larger than the block, offsets on both sides.
    for &(rows, cols, src_ld, dst_ld, so, doff) in &[
        (1usize, 1usize, 1usize, 1usize, 0usize, 0usize),
        (5, 7, 9, 7, 3, 0),
        (3, 257, 300, 261, 1, 2),
        (40, 13, 13, 29, 0, 5),
    ] {
        let src: Vec<T> = random(&mut rng, so + rows * src_ld, -3.0, 3.0);
        let dlen = doff + rows * dst_ld;
        let mut gpu = Gpu::new();
        let ds = gpu.upload(&src);
        let dd = gpu.alloc_bytes(dlen * size::<T>() as usize);
        let args = [
            Arg::Ptr(ds + so as u64 * size::<T>()),
            Arg::Ptr(dd + doff as u64 * size::<T>()),
            Arg::U32(rows as u32),
            Arg::U32(cols as u32),
            Arg::U32(src_ld as u32),
            Arg::U32(dst_ld as u32),
        ];
        gpu.launch(
            layout::copy2d_for(e).unwrap(),
            &Problem::elems((rows * cols) as u64),
            &args,
        )
        .unwrap();
        let got = gpu.read::<T>(dd, dlen);
        // Elements outside the block keep the poison; the block is bit exact.
        let mut want = vec![T::from_f32(f32::NAN); dlen];
        layout::twin::copy2d(&src, so, src_ld, &mut want, doff, dst_ld, rows, cols);
        for r in 0..rows {
            let d = doff + r * dst_ld;
            assert_eq!(
                bits(&got[d..d + cols]),
                bits(&want[d..d + cols]),
                "copy2d {e:?} rows={rows} cols={cols} row {r}"
            );
        }
    }
    for dims in [
        [1usize, 1, 1, 1, 1],
        [2, 3, 1, 5, 7],
        [1, 7, 3, 4, 1],
        [3, 2, 2, 9, 3],
        [1, 33, 1, 65, 1],
    ] {
        let n: usize = dims.iter().product();
        let x: Vec<T> = random(&mut rng, n, -3.0, 3.0);
        let mut gpu = Gpu::new();
        let dx = gpu.upload(&x);
        let dy = gpu.alloc_bytes(n * size::<T>() as usize);
        let args = [
            Arg::Ptr(dx),
            Arg::Ptr(dy),
            Arg::U32(dims[0] as u32),
            Arg::U32(dims[1] as u32),
            Arg::U32(dims[2] as u32),
            Arg::U32(dims[3] as u32),
            Arg::U32(dims[4] as u32),
        ];
        gpu.launch(
            layout::swap_axes_for(e).unwrap(),
            &Problem::elems(n as u64),
            &args,
        )
        .unwrap();
        let got = gpu.read::<T>(dy, n);
        let mut want = x.clone();
        layout::twin::swap_axes(&x, &mut want, dims);
        assert_eq!(bits(&got), bits(&want), "swap_axes {e:?} {dims:?}");
    }
}

#[test]
fn layout_copies_are_bit_exact() {
    layout_case::<f32>(Elem::F32);
    layout_case::<bf16>(Elem::BF16);
    layout_case::<f16>(Elem::F16);
}

fn softmax_case<T: Float + bytemuck::Pod>(e: Elem, rows: usize, c: usize, shift: usize) {
    let mut rng = Rng::new((rows * 100 + c + shift) as u64);
    let x: Vec<T> = random(&mut rng, rows * c + shift, -6.0, 6.0);
    let dy: Vec<T> = random(&mut rng, rows * c + shift, -1.0, 1.0);
    let sh = shift as u64 * size::<T>();
    let bytes = (rows * c + shift) * size::<T>() as usize;
    let p = Problem {
        batch: rows as u64,
        n: c as u64,
        k: 1,
        m: 1,
    };
    let what = format!("softmax {e:?} rows={rows} c={c} shift={shift}");
    let mut gpu = Gpu::new();
    let (dx_in, ddy) = (gpu.upload(&x), gpu.upload(&dy));
    let dy_out = gpu.alloc_bytes(bytes);
    let args = [
        Arg::Ptr(dx_in + sh),
        Arg::Ptr(dy_out + sh),
        Arg::U32(rows as u32),
        Arg::U32(c as u32),
    ];
    gpu.launch(softmax::forward_for(e).unwrap(), &p, &args)
        .unwrap();
    let y = gpu.read::<T>(dy_out + sh, rows * c);
    let mut want = vec![T::from_f32(0.0); rows * c];
    softmax::twin::forward(&x[shift..], &mut want, c);
    check_close(
        &format!("{what} y"),
        &f64s(&y),
        &f64s(&want),
        rel_tolerance(e).max(1e-5),
    )
    .unwrap();
    let dgrad = gpu.alloc_bytes(bytes);
    let args = [
        Arg::Ptr(dy_out + sh),
        Arg::Ptr(ddy + sh),
        Arg::Ptr(dgrad + sh),
        Arg::U32(rows as u32),
        Arg::U32(c as u32),
    ];
    gpu.launch(softmax::backward_for(e).unwrap(), &p, &args)
        .unwrap();
    let got = gpu.read::<T>(dgrad + sh, rows * c);
    let mut want_dx = vec![T::from_f32(0.0); rows * c];
    softmax::twin::backward(&y, &dy[shift..], &mut want_dx, c);
    check_close(
        &format!("{what} dx"),
        &f64s(&got),
        &f64s(&want_dx),
        rel_tolerance(e).max(1e-5),
    )
    .unwrap();
}

#[test]
fn softmax_forward_and_backward_match_twins() {
    softmax_case::<f32>(Elem::F32, 1, 1, 0);
    softmax_case::<f32>(Elem::F32, 5, 68, 0);
    softmax_case::<f32>(Elem::F32, 3, 1031, 1);
    softmax_case::<bf16>(Elem::BF16, 4, 516, 0);
    softmax_case::<bf16>(Elem::BF16, 7, 33, 3);
    softmax_case::<f16>(Elem::F16, 6, 40, 1);
    softmax_case::<f16>(Elem::F16, 2, 2053, 0);
}
