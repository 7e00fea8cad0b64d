//! Every registry kernel against its CPU twin on the GPU: fresh random inputs (never zeros),
//! outputs poisoned with NaN before the launch, awkward sizes, the dtype tolerance formula.
//! Skips without a GPU; fails instead with `LATHE_REQUIRE_GPU=1`.

use half::{bf16, f16};
use lathe_host::testing::{AWKWARD_SIZES, test_device};
use lathe_host::{Device, DeviceBuffer, DeviceElem, KernelArg};
use lathe_kernels::Problem;
use lathe_kernels::elementwise::cast_for;
use lathe_kernels::elementwise::twin::{self, Float};
use lathe_kernels::reduce::twin as rtwin;
use lathe_kernels::rng::Rng;
use lathe_kernels::tolerance::{check_close, rel_tolerance};

fn random<T: Float>(rng: &mut Rng, n: usize) -> Vec<T> {
    (0..n)
        .map(|_| T::from_f32(rng.range_f32(-4.0, 4.0)))
        .collect()
}

fn poisoned<T: DeviceElem + Float>(dev: &Device, n: usize) -> DeviceBuffer<T> {
    dev.htod(&vec![T::from_f32(f32::NAN); n])
        .expect("poisoned buffer")
}

fn as_f64<T: Float>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f32() as f64).collect()
}

/// A kernel argument pointing `off` elements into `b` (to exercise the unaligned path).
fn shifted<T: DeviceElem>(b: &mut DeviceBuffer<T>, off: usize, writable: bool) -> KernelArg {
    let KernelArg::Ptr {
        addr, elem, len, ..
    } = b.arg_mut()
    else {
        unreachable!()
    };
    KernelArg::Ptr {
        addr: addr + (off * size_of::<T>()) as u64,
        elem,
        len: len - off,
        writable,
    }
}

/// Runs a cast kernel at every awkward size, on aligned buffers and one element in (the
/// scalar path), against the twin.
fn check_cast<A, B>(dev: &Device, rng: &mut Rng)
where
    A: DeviceElem + Float,
    B: DeviceElem + Float,
{
    let k = cast_for(A::ELEM, B::ELEM).expect("cast kernel");
    for &n in AWKWARD_SIZES {
        for off in [0usize, 1] {
            let x: Vec<A> = random(rng, n + off);
            let mut dx = dev.htod(&x).unwrap();
            let mut dy = poisoned::<B>(dev, n + off);
            let args = [
                shifted(&mut dx, off, false),
                shifted(&mut dy, off, true),
                KernelArg::U64(n as u64),
            ];
            dev.launch(k, &Problem::elems(n as u64), &args, dev.compute_stream())
                .unwrap();
            let got = dy.to_vec().unwrap();
            let mut want = vec![B::from_f32(0.0); n];
            twin::cast(&x[off..], &mut want);
            let tol = rel_tolerance(B::ELEM).min(rel_tolerance(A::ELEM));
            let what = format!("{} n={n} offset={off}", k.entry);
            if let Err(e) = check_close(&what, &as_f64(&got[off..]), &as_f64(&want), tol) {
                panic!("{e}");
            }
            if off == 1 {
                assert!(got[0].to_f32().is_nan(), "{what}: wrote before its range");
            }
        }
    }
}

#[test]
fn casts_match_twins_at_awkward_sizes() {
    let dev = test_device("casts_match_twins_at_awkward_sizes");
    let mut rng = Rng::new(0xCA57);
    check_cast::<f32, bf16>(&dev, &mut rng);
    check_cast::<f32, f16>(&dev, &mut rng);
    check_cast::<bf16, f32>(&dev, &mut rng);
    check_cast::<f16, f32>(&dev, &mut rng);
    check_cast::<bf16, f16>(&dev, &mut rng);
    check_cast::<f16, bf16>(&dev, &mut rng);
}

#[test]
fn casts_round_ties_to_even_and_keep_nan_inf() {
    let dev = test_device("casts_round_ties_to_even_and_keep_nan_inf");
    let x = vec![
        1.0 + 1.0 / 256.0,
        1.0 + 3.0 / 256.0,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        -0.0,
        3.0e38,
        1.0e-40,
    ];
    let dx = dev.htod(&x).unwrap();
    let mut db = poisoned::<bf16>(&dev, x.len());
    dev.cast(&dx, &mut db).unwrap();
    let got = db.to_vec().unwrap();
    for (i, (&g, &v)) in got.iter().zip(&x).enumerate() {
        let want = bf16::from_f32(v);
        if want.is_nan() {
            assert!(g.is_nan(), "element {i}: NaN lost");
        } else {
            assert_eq!(
                g.to_bits(),
                want.to_bits(),
                "element {i}: {v} -> {g} (want {want})"
            );
        }
    }
    let mut dh = poisoned::<f16>(&dev, x.len());
    dev.cast(&dx, &mut dh).unwrap();
    let got = dh.to_vec().unwrap();
    for (i, (&g, &v)) in got.iter().zip(&x).enumerate() {
        let want = f16::from_f32(v);
        if want.is_nan() {
            assert!(g.is_nan(), "element {i}: NaN lost");
        } else {
            assert_eq!(
                g.to_bits(),
                want.to_bits(),
                "element {i}: {v} -> {g} (want {want})"
            );
        }
    }
}

#[test]
fn fill_scale_axpy_match_twins() {
    let dev = test_device("fill_scale_axpy_match_twins");
    let mut rng = Rng::new(0xA1B2);
    fn run<T: DeviceElem + Float>(dev: &Device, rng: &mut Rng, name: &str) {
        for &n in AWKWARD_SIZES {
            let value = rng.range_f32(-3.0, 3.0);
            let mut d = poisoned::<T>(dev, n);
            dev.fill(&mut d, value).unwrap();
            let mut want = vec![T::from_f32(0.0); n];
            twin::fill(&mut want, value);
            check_close(
                &format!("fill {name} n={n}"),
                &as_f64(&d.to_vec().unwrap()),
                &as_f64(&want),
                0.0,
            )
            .unwrap();

            let alpha = rng.range_f32(-2.0, 2.0);
            let x: Vec<T> = random(rng, n);
            let dx = dev.htod(&x).unwrap();
            let mut dy = poisoned::<T>(dev, n);
            dev.scale(&dx, &mut dy, alpha).unwrap();
            let mut want = vec![T::from_f32(0.0); n];
            twin::scale(&x, &mut want, alpha);
            let tol = rel_tolerance(T::ELEM);
            check_close(
                &format!("scale {name} n={n}"),
                &as_f64(&dy.to_vec().unwrap()),
                &as_f64(&want),
                tol,
            )
            .unwrap();

            let y: Vec<T> = random(rng, n);
            let mut dy = dev.htod(&y).unwrap();
            dev.axpy(alpha, &dx, &mut dy).unwrap();
            let mut want = y.clone();
            twin::axpy(&x, &mut want, alpha);
            check_close(
                &format!("axpy {name} n={n}"),
                &as_f64(&dy.to_vec().unwrap()),
                &as_f64(&want),
                tol,
            )
            .unwrap();

            let mut dz = dev.htod(&x).unwrap();
            dev.scale_in_place(&mut dz, alpha).unwrap();
            let mut want = vec![T::from_f32(0.0); n];
            twin::scale(&x, &mut want, alpha);
            check_close(
                &format!("scale in place {name} n={n}"),
                &as_f64(&dz.to_vec().unwrap()),
                &as_f64(&want),
                tol,
            )
            .unwrap();
        }
    }
    run::<f32>(&dev, &mut rng, "f32");
    run::<bf16>(&dev, &mut rng, "bf16");
    run::<f16>(&dev, &mut rng, "f16");
}

#[test]
fn reductions_match_twins() {
    let dev = test_device("reductions_match_twins");
    let mut rng = Rng::new(0x5EED);
    for &n in AWKWARD_SIZES.iter().chain(&[4_000_037usize]) {
        let x = rng.vec_f32(n, -1.0, 1.0);
        let dx = dev.htod(&x).unwrap();
        let mut out = dev.htod(&[f32::NAN]).unwrap();
        dev.sum_into(&dx, &mut out).unwrap();
        let got = out.to_vec().unwrap()[0] as f64;
        // An f32 tree sum errs by at most ~log2(n) * eps * sum|x|; allow 1e-5 * sum|x|.
        let bound = 1e-5 * rtwin::sum_abs(&x);
        assert!(
            (got - rtwin::sum(&x)).abs() <= bound,
            "sum n={n}: {got} vs {} (bound {bound})",
            rtwin::sum(&x)
        );
        // Determinism: the same input gives the same bits.
        assert_eq!(
            dev.sum(&dx).unwrap().to_bits(),
            (got as f32).to_bits(),
            "sum n={n} not deterministic"
        );
        let m = dev.max_abs(&dx).unwrap();
        assert_eq!(m, rtwin::max_abs(&x), "max_abs n={n}");
    }
    // NaN and inf reach max-abs from any position.
    for pos in [0usize, 17, 999_999] {
        let mut x = rng.vec_f32(1_000_003, -1.0, 1.0);
        x[pos] = f32::NAN;
        assert!(
            dev.max_abs(&dev.htod(&x).unwrap()).unwrap().is_nan(),
            "NaN at {pos} lost"
        );
        x[pos] = f32::NEG_INFINITY;
        assert_eq!(dev.max_abs(&dev.htod(&x).unwrap()).unwrap(), f32::INFINITY);
    }
}

#[test]
fn allocator_reuses_and_counts() {
    let dev = test_device("allocator_reuses_and_counts");
    dev.reset_peak_memory();
    let before = dev.memory_stats();
    let a = dev.alloc::<f32>(1000).unwrap();
    let addr = a.addr();
    let s = dev.memory_stats();
    assert_eq!(s.allocated - before.allocated, 4096);
    drop(a);
    let b = dev.alloc::<f32>(900).unwrap();
    assert_eq!(
        b.addr(),
        addr,
        "same stream, same class: the cached block comes back"
    );
    assert!(dev.memory_stats().peak_allocated >= before.allocated + 4096);
}

#[test]
fn pinned_copies_roundtrip_on_the_copy_stream() {
    let dev = test_device("pinned_copies_roundtrip_on_the_copy_stream");
    let mut rng = Rng::new(9);
    let n = 1_000_003;
    let x = rng.vec_f32(n, -1.0, 1.0);
    let mut pin = lathe_host::PinnedBuffer::<f32>::new(&dev, n).unwrap();
    pin.as_mut_slice().unwrap().copy_from_slice(&x);
    let mut d = dev.alloc::<f32>(n).unwrap();
    let copy = dev.copy_stream().clone();
    pin.copy_to_device_async(&mut d, &copy).unwrap();
    dev.compute_stream().join(&copy).unwrap();
    dev.scale_in_place(&mut d, 2.0).unwrap();
    let mut back = lathe_host::PinnedBuffer::<f32>::new(&dev, n).unwrap();
    copy.join(dev.compute_stream()).unwrap();
    back.copy_from_device_async(&d, &copy).unwrap();
    let got = back.as_slice().unwrap();
    for i in 0..n {
        assert_eq!(got[i], 2.0 * x[i], "element {i}");
    }
}

#[test]
fn bad_launches_are_errors() {
    let dev = test_device("bad_launches_are_errors");
    let x = dev.htod(&[1.0f32, 2.0]).unwrap();
    let mut y = dev.alloc::<bf16>(3).unwrap();
    assert!(dev.cast(&x, &mut y).is_err(), "length mismatch accepted");
    let k = &lathe_kernels::elementwise::SCALE_F32;
    let r = dev.launch(
        k,
        &lathe_kernels::Problem::elems(2),
        &[x.arg()],
        dev.compute_stream(),
    );
    assert!(r.is_err(), "wrong argument count accepted");
}

#[test]
fn kernel_timing_records_every_launch() {
    let dev = test_device("kernel_timing_records_every_launch");
    let n = 1 << 20;
    let x = dev.htod(&Rng::new(3).vec_f32(n, -1.0, 1.0)).unwrap();
    let mut y = dev.alloc::<bf16>(n).unwrap();
    assert!(
        dev.take_kernel_timings().unwrap().is_none(),
        "off by default"
    );
    dev.enable_kernel_timing().unwrap();
    dev.cast(&x, &mut y).unwrap();
    let _ = dev.sum(&x).unwrap(); // two launches
    let t = dev.take_kernel_timings().unwrap().expect("timing on");
    let entries: Vec<&str> = t.kernels.iter().map(|k| k.entry).collect();
    assert_eq!(
        entries,
        ["lathe_cast_f32_bf16", "lathe_sum_f32", "lathe_sum_f32"]
    );
    assert!(t.kernels.iter().all(|k| k.dur_ns > 0), "{:?}", t.kernels);
    assert!(
        t.kernels[1].start_ns >= t.kernels[0].start_ns,
        "in stream order"
    );
    assert_eq!(t.kernels[0].bytes, 6 * n as u64, "cost from the descriptor");
    dev.disable_kernel_timing();
    dev.cast(&x, &mut y).unwrap();
    assert!(dev.take_kernel_timings().unwrap().is_none());
}
