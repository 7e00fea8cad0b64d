//! The simulated device behind the `Device` API: its properties, out-of-memory through the
//! caching allocator, sanitizer findings as launch errors that name the kernel and PTX line, and
//! the device staying usable after a faulting launch.

use lathe_host::{Device, Error, KernelArg, SimConfig};
use lathe_kernels::Problem;
use lathe_kernels::elementwise::scale_for;

#[test]
fn the_simulated_device_looks_like_an_h100() {
    let dev = Device::sim().unwrap();
    assert!(dev.is_sim());
    assert_eq!(dev.compute_capability(), (9, 0));
    assert_eq!(dev.sm_count(), 132);
    assert_eq!(dev.max_shared_per_block_optin(), 227 * 1024);
    assert!(dev.describe().starts_with("sim:"), "{}", dev.describe());
    assert!(dev.cudarc_context().is_err());
    assert!(dev.compute_stream().raw().is_none());
    let (free, total) = dev.memory_info().unwrap();
    assert_eq!(free, total);
    // Events carry no time on the simulator: asking for one is an error, not a made-up number.
    let a = dev.compute_stream().record().unwrap();
    let b = dev.compute_stream().record().unwrap();
    assert!(b.is_complete());
    let e = a.elapsed_ms(&b).unwrap_err().to_string();
    assert!(e.contains("no timing model"), "{e}");
}

#[test]
fn out_of_memory_on_a_small_simulated_device_is_the_allocators_error() {
    let dev = Device::sim_with(SimConfig {
        memory_bytes: 8 << 20,
        ..SimConfig::default()
    });
    let keep = dev.alloc::<f32>(1 << 20).unwrap(); // 4 MiB of 8
    let e = dev.alloc::<f32>(2 << 20).unwrap_err(); // 8 MiB more
    assert!(matches!(e, Error::OutOfMemory { .. }), "{e}");
    let msg = e.to_string();
    for want in [
        "tried to allocate 8388608 bytes",
        "--accum",
        "--recompute",
        "--zero",
    ] {
        assert!(msg.contains(want), "{want} missing from: {msg}");
    }
    // Freed memory is reusable, and the peak counts what was held.
    drop(keep);
    dev.empty_cache();
    let again = dev.alloc::<f32>(2 << 20);
    assert!(again.is_ok(), "{:?}", again.err());
    assert!(dev.memory_stats().peak_allocated >= 4 << 20);
}

#[test]
fn a_faulting_launch_is_an_error_naming_the_kernel_and_the_device_stays_usable() {
    let dev = Device::sim().unwrap();
    let k = scale_for(lathe_kernels::Elem::F32).unwrap();
    let x: Vec<f32> = (0..100).map(|i| 0.5 + i as f32).collect();
    let mut buf = dev.htod(&x).unwrap();
    // The kernel is told about 1000 elements while the buffers hold 100: a bug a GPU would let
    // through silently (or corrupt a neighbour); the simulator stops at the first stray access.
    let args = [
        buf.arg(),
        buf.arg_mut(),
        KernelArg::U64(1000),
        KernelArg::F32(2.0),
    ];
    let e = dev
        .launch(k, &Problem::elems(1000), &args, dev.compute_stream())
        .unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Sim { .. }), "{msg}");
    assert!(msg.contains("lathe_scale_f32"), "{msg}");
    assert!(msg.contains("PTX line"), "{msg}");
    assert!(msg.contains("OutOfBounds"), "{msg}");
    // The same device runs the correct launch afterwards.
    dev.scale_in_place(&mut buf, 2.0).unwrap();
    let got = buf.to_vec().unwrap();
    assert!(got.iter().zip(&x).all(|(g, x)| *g == 2.0 * x));
}

#[test]
fn reading_a_buffer_nothing_wrote_is_caught() {
    let dev = Device::sim().unwrap();
    let never_written = dev.alloc::<f32>(64).unwrap();
    let mut out = dev.alloc::<f32>(64).unwrap();
    let e = dev
        .axpy(1.0, &never_written, &mut out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("Uninitialized"), "{e}");
}
