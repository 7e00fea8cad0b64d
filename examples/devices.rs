//! Lists CUDA devices and runs one kernel (a bf16 cast) on device 0, checked against its CPU
//! twin.
//!
//!     cargo run --release -p lathe-examples --example devices

use half::bf16;
use lathe_host::Device;
use lathe_kernels::elementwise::twin;
use lathe_kernels::rng::Rng;

fn main() -> anyhow::Result<()> {
    let count = Device::count()?;
    let (major, minor) = lathe_host::driver::driver_version()?;
    println!("CUDA driver API {major}.{minor}, {count} device(s)");
    for i in 0..count {
        let d = Device::cuda(i)?;
        let (free, total) = d.memory_info()?;
        println!(
            "  {}  {:.1} GiB free of {:.1} GiB",
            d.describe(),
            free as f64 / (1u64 << 30) as f64,
            total as f64 / (1u64 << 30) as f64
        );
    }
    if count == 0 {
        return Ok(());
    }
    let dev = Device::cuda(0)?;
    let n = 1_000_003;
    let x = Rng::new(1).vec_f32(n, -10.0, 10.0);
    let dx = dev.htod(&x)?;
    let mut dy = dev.htod(&vec![bf16::NAN; n])?;
    let t = std::time::Instant::now();
    dev.cast(&dx, &mut dy)?;
    let got = dy.to_vec()?;
    let elapsed = t.elapsed();
    let mut want = vec![bf16::ZERO; n];
    twin::cast(&x, &mut want);
    let mismatches = got
        .iter()
        .zip(&want)
        .filter(|(g, w)| g.to_bits() != w.to_bits())
        .count();
    println!(
        "lathe_cast_f32_bf16 over {n} elements on {}: {mismatches} mismatches against the CPU \
         twin ({elapsed:.2?} including JIT load and copy back)",
        dev.name()
    );
    anyhow::ensure!(mismatches == 0, "the GPU cast disagrees with its CPU twin");
    Ok(())
}
