//! The autograd tape's device kernels (`Device::softmax_*`, `xent_*`, `mul`, `relu_*`, `add_into`,
//! `fill_from_*`, `gather_rows*`, `copy_2d`, `swap_axes`, and the offset copies of
//! `DeviceBuffer`) against their CPU twins: fresh random inputs (never zeros), outputs poisoned
//! with NaN before each launch, awkward shapes (1 row, odd sizes, tails around the vector
//! width and the block), f32 / bf16 / f16. Pure copies and selections are compared bit for
//! bit, arithmetic under the dtype's tolerance formula. Shape errors come back as errors
//! before any launch. Runs on a machine with a GPU when there is one, else on the simulated
//! device; fails instead with `LATHE_REQUIRE_GPU=1` and no GPU.

use half::{bf16, f16};
use lathe_host::testing::test_device;
use lathe_host::{Device, DeviceBuffer, DeviceElem};
use lathe_kernels::elementwise::twin::Float;
use lathe_kernels::nn::amp::StepState;
use lathe_kernels::nn::{embedding, gather, layout, softmax, tape_pointwise, xent};
use lathe_kernels::rng::Rng;
use lathe_kernels::tolerance::{check_close, rel_tolerance};

fn random<T: Float>(rng: &mut Rng, n: usize, lo: f32, hi: f32) -> Vec<T> {
    (0..n).map(|_| T::from_f32(rng.range_f32(lo, hi))).collect()
}

fn poisoned<T: DeviceElem + Float>(dev: &Device, n: usize) -> DeviceBuffer<T> {
    dev.htod(&vec![T::from_f32(f32::NAN); n])
        .expect("poisoned buffer")
}

fn f64s<T: Float>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f32() as f64).collect()
}

fn close<T: Float>(what: &str, got: &[T], want: &[T], tol: f64) {
    if let Err(e) = check_close(what, &f64s(got), &f64s(want), tol) {
        panic!("{e}");
    }
}

/// Bit-for-bit equality (NaN equals NaN), reporting the first difference.
fn exact<T: Float>(what: &str, got: &[T], want: &[T]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (g.to_f32(), w.to_f32());
        assert!(
            g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
            "{what}: element {i} is {g:e}, the twin's {w:e}"
        );
    }
}

fn tol(e: lathe_kernels::Elem) -> f64 {
    rel_tolerance(e).max(1e-5)
}

fn xent_case<T: DeviceElem + Float>(dev: &Device, rng: &mut Rng, rows: usize, vp: usize, v: usize) {
    let ign = u32::MAX;
    let logits: Vec<T> = random(rng, rows * vp, -5.0, 5.0);
    let targets: Vec<u32> = (0..rows)
        .map(|r| {
            if r % 4 == 1 {
                ign
            } else {
                rng.below(v as u64) as u32
            }
        })
        .collect();
    let what = format!("xent {} rows={rows} vp={vp} v={v}", T::ELEM.name());
    let (dl, dt) = (dev.htod(&logits).unwrap(), dev.htod(&targets).unwrap());
    let mut losses = poisoned::<f32>(dev, rows);
    let mut lse = poisoned::<f32>(dev, rows);
    dev.xent_forward(&dl, &dt, &mut losses, &mut lse, vp, v, ign)
        .unwrap();
    let (mut wl, mut ws) = (vec![0f32; rows], vec![0f32; rows]);
    xent::twin::forward(&logits, &targets, &mut wl, &mut ws, vp, v, ign);
    let got_lse = lse.to_vec().unwrap();
    close(&format!("{what} lse"), &got_lse, &ws, 1e-5);
    close(
        &format!("{what} losses"),
        &losses.to_vec().unwrap(),
        &wl,
        1e-5,
    );
    // The loss's incoming gradient lives on the device; the host passes 1 / scored rows.
    let scored = targets.iter().filter(|&&t| t != ign).count().max(1);
    let factor = 1.0 / scored as f32;
    let gscale = dev.htod(&[0.75f32]).unwrap();
    let mut dlogits = poisoned::<T>(dev, rows * vp);
    dev.xent_backward(&dl, &lse, &dt, &gscale, factor, &mut dlogits, vp, v, ign)
        .unwrap();
    let mut want = vec![T::from_f32(0.0); rows * vp];
    xent::twin::backward(
        &logits,
        &got_lse,
        &targets,
        0.75 * factor,
        &mut want,
        vp,
        v,
        ign,
    );
    let got = dlogits.to_vec().unwrap();
    close(&format!("{what} dlogits"), &got, &want, tol(T::ELEM));
    // Fixed reduction orders: a second run gives the same bits.
    let mut lse2 = poisoned::<f32>(dev, rows);
    dev.xent_forward(&dl, &dt, &mut losses, &mut lse2, vp, v, ign)
        .unwrap();
    exact(
        &format!("{what} lse rerun"),
        &lse2.to_vec().unwrap(),
        &got_lse,
    );
    for (r, &t) in targets.iter().enumerate() {
        let row = &got[r * vp..(r + 1) * vp];
        assert!(
            row[v..].iter().all(|x| x.to_f32() == 0.0),
            "{what}: padding of row {r}"
        );
        if t == ign {
            assert!(
                row.iter().all(|x| x.to_f32() == 0.0),
                "{what}: ignored row {r}"
            );
        }
    }
}

#[test]
fn xent_forward_and_backward_match_twins() {
    let dev = test_device("xent_forward_and_backward_match_twins");
    let mut rng = Rng::new(0x7E);
    xent_case::<f32>(&dev, &mut rng, 1, 5, 5);
    xent_case::<f32>(&dev, &mut rng, 9, 70, 65);
    xent_case::<f32>(&dev, &mut rng, 4, 1027, 1000);
    xent_case::<bf16>(&dev, &mut rng, 7, 260, 257);
    xent_case::<bf16>(&dev, &mut rng, 3, 33, 33);
    xent_case::<f16>(&dev, &mut rng, 6, 131, 100);
    xent_case::<f16>(&dev, &mut rng, 1, 4, 3);
}

#[test]
fn xent_shape_errors_are_errors() {
    let dev = test_device("xent_shape_errors_are_errors");
    let logits = dev.htod(&[1.0f32; 12]).unwrap();
    let targets = dev.htod(&[0u32, 1, 2]).unwrap();
    let mut losses = dev.alloc::<f32>(3).unwrap();
    let mut lse = dev.alloc::<f32>(3).unwrap();
    // v > vp, vp not dividing, too few targets.
    assert!(
        dev.xent_forward(&logits, &targets, &mut losses, &mut lse, 4, 5, 9)
            .is_err()
    );
    assert!(
        dev.xent_forward(&logits, &targets, &mut losses, &mut lse, 5, 5, 9)
            .is_err()
    );
    assert!(
        dev.xent_forward(&logits, &targets, &mut losses, &mut lse, 3, 3, 9)
            .is_err()
    );
    let empty = dev.alloc::<f32>(0).unwrap();
    let mut d = dev.alloc::<f32>(12).unwrap();
    let e = dev
        .xent_backward(&logits, &lse, &targets, &empty, 1.0, &mut d, 4, 4, 9)
        .unwrap_err();
    assert!(e.to_string().contains("gscale"), "{e}");
}

fn pointwise_case<T: DeviceElem + Float>(dev: &Device, rng: &mut Rng, n: usize) {
    let a: Vec<T> = random(rng, n, -3.0, 3.0);
    let b: Vec<T> = random(rng, n, -2.0, 2.0);
    let what = format!("{} n={n}", T::ELEM.name());
    let (da, db) = (dev.htod(&a).unwrap(), dev.htod(&b).unwrap());
    let mut out = poisoned::<T>(dev, n);
    dev.mul(&da, &db, &mut out).unwrap();
    let mut want = vec![T::from_f32(0.0); n];
    tape_pointwise::twin::mul(&a, &b, &mut want);
    close(
        &format!("mul {what}"),
        &out.to_vec().unwrap(),
        &want,
        tol(T::ELEM),
    );
    let mut y = poisoned::<T>(dev, n);
    dev.relu_forward(&da, &mut y).unwrap();
    let mut wy = vec![T::from_f32(0.0); n];
    tape_pointwise::twin::relu_fwd(&a, &mut wy);
    exact(&format!("relu {what}"), &y.to_vec().unwrap(), &wy);
    let mut dx = poisoned::<T>(dev, n);
    dev.relu_backward(&y, &db, &mut dx).unwrap();
    let mut wdx = vec![T::from_f32(0.0); n];
    tape_pointwise::twin::relu_bwd(&wy, &b, &mut wdx);
    exact(
        &format!("relu backward {what}"),
        &dx.to_vec().unwrap(),
        &wdx,
    );
}

#[test]
fn mul_and_relu_match_twins() {
    let dev = test_device("mul_and_relu_match_twins");
    let mut rng = Rng::new(0x3E1);
    for n in [1usize, 3, 31, 255, 1000, 4099] {
        pointwise_case::<f32>(&dev, &mut rng, n);
        pointwise_case::<bf16>(&dev, &mut rng, n);
        pointwise_case::<f16>(&dev, &mut rng, n);
    }
    let (a, b) = (dev.alloc::<f32>(3).unwrap(), dev.alloc::<f32>(4).unwrap());
    let mut o = dev.alloc::<f32>(3).unwrap();
    assert!(dev.mul(&a, &b, &mut o).is_err());
}

fn add_into_case<X: DeviceElem + Float, Y: DeviceElem + Float>(
    dev: &Device,
    rng: &mut Rng,
    n: usize,
) {
    let x: Vec<X> = random(rng, n, -3.0, 3.0);
    let y: Vec<Y> = random(rng, n, -3.0, 3.0);
    let mut dy = dev.htod(&y).unwrap();
    dev.add_into(&dev.htod(&x).unwrap(), &mut dy).unwrap();
    let mut want = y.clone();
    tape_pointwise::twin::add_into(&x, &mut want);
    exact(
        &format!("add_into {} -> {} n={n}", X::ELEM.name(), Y::ELEM.name()),
        &dy.to_vec().unwrap(),
        &want,
    );
}

#[test]
fn add_into_matches_twin_for_every_dtype_pair() {
    let dev = test_device("add_into_matches_twin_for_every_dtype_pair");
    let mut rng = Rng::new(0xADD);
    for n in [1usize, 5, 257, 4099] {
        add_into_case::<f32, f32>(&dev, &mut rng, n);
        add_into_case::<f32, bf16>(&dev, &mut rng, n);
        add_into_case::<f32, f16>(&dev, &mut rng, n);
        add_into_case::<bf16, f32>(&dev, &mut rng, n);
        add_into_case::<bf16, bf16>(&dev, &mut rng, n);
        add_into_case::<bf16, f16>(&dev, &mut rng, n);
        add_into_case::<f16, f32>(&dev, &mut rng, n);
        add_into_case::<f16, bf16>(&dev, &mut rng, n);
        add_into_case::<f16, f16>(&dev, &mut rng, n);
    }
    let x = dev.alloc::<u32>(4).unwrap();
    let mut y = dev.alloc::<f32>(4).unwrap();
    assert!(dev.add_into(&x, &mut y).is_err());
}

#[test]
fn fills_read_their_scalar_on_the_device() {
    let dev = test_device("fills_read_their_scalar_on_the_device");
    let src = dev.htod(&[1.5f32, -2.25, 8.0]).unwrap();
    for n in [1usize, 3, 1000, 4099] {
        let mut o = poisoned::<bf16>(&dev, n);
        dev.fill_from_scalar(&src, 1, 0.5, &mut o).unwrap();
        exact(
            "fill bf16",
            &o.to_vec().unwrap(),
            &vec![bf16::from_f32(-1.125); n],
        );
        let mut o = poisoned::<f16>(&dev, n);
        dev.fill_from_scalar(&src, 2, 0.1, &mut o).unwrap();
        exact(
            "fill f16",
            &o.to_vec().unwrap(),
            &vec![f16::from_f32(8.0 * 0.1); n],
        );
        let mut o = poisoned::<f32>(&dev, n);
        dev.fill_from_scalar(&src, 0, 3.0, &mut o).unwrap();
        exact("fill f32", &o.to_vec().unwrap(), &vec![4.5f32; n]);
    }
    let mut o = dev.alloc::<f32>(2).unwrap();
    assert!(dev.fill_from_scalar(&src, 3, 1.0, &mut o).is_err());
    // The step state's loss scale (word SCALE, an f32), read from device memory.
    let state = dev.step_state(&StepState::new(65536.0)).unwrap();
    let mut o = poisoned::<f32>(&dev, 37);
    dev.fill_from_state_scale(&state, 0.25, &mut o).unwrap();
    exact("state scale", &o.to_vec().unwrap(), &[16384.0f32; 37]);
    let short = dev.alloc::<u32>(3).unwrap();
    assert!(dev.fill_from_state_scale(&short, 1.0, &mut o).is_err());
}

fn gather_case<T: DeviceElem + Float>(
    dev: &Device,
    rng: &mut Rng,
    n: usize,
    rows: usize,
    c: usize,
) {
    let table: Vec<T> = random(rng, rows * c, -2.0, 2.0);
    let mut ids: Vec<u32> = (0..n).map(|_| rng.below(rows as u64) as u32).collect();
    for k in (0..n).step_by(5) {
        ids[k] = 1.min(rows as u32 - 1); // a frequent id
    }
    ids[n / 2] = rows as u32; // invalid
    let what = format!("gather {} n={n} rows={rows} c={c}", T::ELEM.name());
    let di = dev.htod(&ids).unwrap();
    let mut out = poisoned::<T>(dev, n * c);
    dev.gather_rows(&di, &dev.htod(&table).unwrap(), &mut out, c)
        .unwrap();
    let mut want = vec![T::from_f32(0.0); n * c];
    gather::twin::gather_rows(&ids, &table, &mut want, c);
    exact(&what, &out.to_vec().unwrap(), &want);
    // Backward: accumulates into a non-zero gradient, bit for bit with the twin.
    let dout: Vec<T> = random(rng, n * c, -1.0, 1.0);
    let g0 = rng.vec_f32(rows * c, -1.0, 1.0);
    let mut dg = dev.htod(&g0).unwrap();
    dev.gather_rows_backward(&di, &dev.htod(&dout).unwrap(), &mut dg, c)
        .unwrap();
    let mut wg = g0.clone();
    let tokens: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
    embedding::twin::backward_tok(&tokens, &dout, &mut wg, c);
    exact(&format!("{what} backward"), &dg.to_vec().unwrap(), &wg);
}

#[test]
fn gather_rows_and_backward_match_twins() {
    let dev = test_device("gather_rows_and_backward_match_twins");
    let mut rng = Rng::new(0x6A7);
    gather_case::<f32>(&dev, &mut rng, 1, 1, 3);
    gather_case::<f32>(&dev, &mut rng, 13, 70, 129);
    gather_case::<bf16>(&dev, &mut rng, 33, 9, 257);
    gather_case::<f16>(&dev, &mut rng, 8, 130, 64);
    let ids = dev.htod(&[0u32, 1]).unwrap();
    let table = dev.alloc::<f32>(10).unwrap();
    let mut out = dev.alloc::<f32>(10).unwrap();
    assert!(dev.gather_rows(&ids, &table, &mut out, 3).is_err());
    assert!(dev.gather_rows(&ids, &table, &mut out, 0).is_err());
}

fn copy_2d_case<T: DeviceElem + Float>(dev: &Device, rng: &mut Rng) {
    for &(rows, cols, sld, dld, so, doff) in &[
        (1usize, 1usize, 1usize, 1usize, 0usize, 0usize),
        (7, 5, 12, 5, 3, 0),
        (3, 300, 301, 600, 1, 300),
        (65, 3, 3, 9, 0, 6),
    ] {
        let src: Vec<T> = random(rng, so + rows * sld, -3.0, 3.0);
        let dst0: Vec<T> = random(rng, doff + rows * dld, -3.0, 3.0);
        let mut dd = dev.htod(&dst0).unwrap();
        dev.copy_2d(
            &dev.htod(&src).unwrap(),
            so,
            sld,
            &mut dd,
            doff,
            dld,
            rows,
            cols,
        )
        .unwrap();
        let mut want = dst0.clone();
        layout::twin::copy2d(&src, so, sld, &mut want, doff, dld, rows, cols);
        exact(
            &format!("copy_2d {} {rows}x{cols}", T::ELEM.name()),
            &dd.to_vec().unwrap(),
            &want,
        );
    }
    // Out of range: a block past the end of either buffer.
    let s = dev.alloc::<T>(10).unwrap();
    let mut d = dev.alloc::<T>(10).unwrap();
    assert!(dev.copy_2d(&s, 0, 5, &mut d, 0, 5, 3, 5).is_err());
    assert!(dev.copy_2d(&s, 1, 5, &mut d, 0, 5, 2, 5).is_err());
    assert!(dev.copy_2d(&s, 0, 5, &mut d, 0, 4, 2, 5).is_err());
    assert!(dev.copy_2d(&s, 0, 5, &mut d, 0, 5, 2, 5).is_ok());
}

fn swap_case<T: DeviceElem + Float>(dev: &Device, rng: &mut Rng) {
    for dims in [
        [1usize, 1, 1, 1, 1],
        [2, 3, 1, 5, 7],
        [4, 17, 1, 33, 1],
        [1, 6, 3, 5, 64],
        [3, 1, 2, 9, 2],
    ] {
        let n: usize = dims.iter().product();
        let x: Vec<T> = random(rng, n, -3.0, 3.0);
        let mut y = poisoned::<T>(dev, n);
        dev.swap_axes(&dev.htod(&x).unwrap(), &mut y, dims).unwrap();
        let mut want = x.clone();
        layout::twin::swap_axes(&x, &mut want, dims);
        exact(
            &format!("swap_axes {} {dims:?}", T::ELEM.name()),
            &y.to_vec().unwrap(),
            &want,
        );
    }
    let x = dev.alloc::<T>(6).unwrap();
    let mut y = dev.alloc::<T>(6).unwrap();
    assert!(dev.swap_axes(&x, &mut y, [1, 2, 1, 4, 1]).is_err());
}

#[test]
fn layout_copies_are_bit_exact() {
    let dev = test_device("layout_copies_are_bit_exact");
    let mut rng = Rng::new(0x1A7);
    copy_2d_case::<f32>(&dev, &mut rng);
    copy_2d_case::<bf16>(&dev, &mut rng);
    copy_2d_case::<f16>(&dev, &mut rng);
    swap_case::<f32>(&dev, &mut rng);
    swap_case::<bf16>(&dev, &mut rng);
    swap_case::<f16>(&dev, &mut rng);
}

#[test]
fn offset_host_copies_check_their_ranges() {
    let dev = test_device("offset_host_copies_check_their_ranges");
    let mut rng = Rng::new(0x0FF);
    let base: Vec<bf16> = random(&mut rng, 37, -1.0, 1.0);
    let mut b = dev.htod(&base).unwrap();
    let part: Vec<bf16> = random(&mut rng, 5, 2.0, 3.0);
    b.copy_from_host_at(31, &part).unwrap();
    let mut want = base.clone();
    want[31..36].copy_from_slice(&part);
    exact("copy_from_host_at", &b.to_vec().unwrap(), &want);
    let mut back = vec![bf16::ZERO; 7];
    b.copy_to_host_at(30, &mut back).unwrap();
    exact("copy_to_host_at", &back, &want[30..37]);
    // Empty ranges at the end are fine; past the end (or overflowing) is an error.
    b.copy_from_host_at(37, &[]).unwrap();
    assert!(b.copy_from_host_at(33, &part).is_err());
    assert!(b.copy_to_host_at(usize::MAX, &mut back).is_err());
    assert!(b.copy_to_host_at(31, &mut back).is_err());
    exact("unchanged after errors", &b.to_vec().unwrap(), &want);
}

fn softmax_case<T: DeviceElem + Float>(dev: &Device, rng: &mut Rng, rows: usize, c: usize) {
    let x: Vec<T> = random(rng, rows * c, -6.0, 6.0);
    let dy: Vec<T> = random(rng, rows * c, -1.0, 1.0);
    let what = format!("softmax {} rows={rows} c={c}", T::ELEM.name());
    let mut y = poisoned::<T>(dev, rows * c);
    dev.softmax_forward(&dev.htod(&x).unwrap(), &mut y, c)
        .unwrap();
    let got_y = y.to_vec().unwrap();
    let mut want = vec![T::from_f32(0.0); rows * c];
    softmax::twin::forward(&x, &mut want, c);
    close(&format!("{what} y"), &got_y, &want, tol(T::ELEM));
    let mut y2 = poisoned::<T>(dev, rows * c);
    dev.softmax_forward(&dev.htod(&x).unwrap(), &mut y2, c)
        .unwrap();
    exact(&format!("{what} rerun"), &y2.to_vec().unwrap(), &got_y);
    let mut dx = poisoned::<T>(dev, rows * c);
    dev.softmax_backward(&y, &dev.htod(&dy).unwrap(), &mut dx, c)
        .unwrap();
    let mut want_dx = vec![T::from_f32(0.0); rows * c];
    softmax::twin::backward(&got_y, &dy, &mut want_dx, c);
    close(
        &format!("{what} dx"),
        &dx.to_vec().unwrap(),
        &want_dx,
        tol(T::ELEM),
    );
}

#[test]
fn softmax_forward_and_backward_match_twins() {
    let dev = test_device("softmax_forward_and_backward_match_twins");
    let mut rng = Rng::new(0x5F7);
    softmax_case::<f32>(&dev, &mut rng, 1, 1);
    softmax_case::<f32>(&dev, &mut rng, 7, 255);
    softmax_case::<f32>(&dev, &mut rng, 3, 1028);
    softmax_case::<bf16>(&dev, &mut rng, 5, 67);
    softmax_case::<bf16>(&dev, &mut rng, 2, 4099);
    softmax_case::<f16>(&dev, &mut rng, 9, 31);
    let x = dev.alloc::<f32>(10).unwrap();
    let mut y = dev.alloc::<f32>(10).unwrap();
    assert!(dev.softmax_forward(&x, &mut y, 3).is_err());
    assert!(dev.softmax_forward(&x, &mut y, 0).is_err());
}
