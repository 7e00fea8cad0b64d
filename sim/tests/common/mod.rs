//! Helpers shared by the simulator's tests: a seeded generator and typed device buffers.
#![allow(dead_code)]

use lathe_sim::{Sim, SimConfig};

/// xorshift64*: deterministic, no dependencies.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn u32(&mut self) -> u32 {
        (self.u64() >> 32) as u32
    }
    /// Uniform in [-1, 1), never exactly zero.
    pub fn f32(&mut self) -> f32 {
        loop {
            let v = (self.u32() >> 8) as f32 / (1u32 << 23) as f32 - 1.0;
            if v != 0.0 {
                return v;
            }
        }
    }
}

/// A single-threaded simulator (so error sites are deterministic).
pub fn sim() -> Sim {
    Sim::new(SimConfig {
        parallel_blocks: false,
        ..SimConfig::default()
    })
}

pub fn upload_u32(sim: &Sim, v: &[u32]) -> u64 {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    let a = sim.alloc(bytes.len() as u64).expect("alloc");
    sim.write(a, &bytes).expect("write");
    a
}

pub fn upload_f32(sim: &Sim, v: &[f32]) -> u64 {
    upload_u32(sim, &v.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
}

pub fn upload_u16(sim: &Sim, v: &[u16]) -> u64 {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    let a = sim.alloc(bytes.len() as u64).expect("alloc");
    sim.write(a, &bytes).expect("write");
    a
}

/// An output buffer of `n` words poisoned with NaN bits.
pub fn poisoned(sim: &Sim, n: usize) -> u64 {
    upload_u32(sim, &vec![0x7fc0_0000; n])
}

pub fn download_u32(sim: &Sim, a: u64, n: usize) -> Vec<u32> {
    let mut b = vec![0u8; n * 4];
    sim.read(a, &mut b).expect("read");
    b.chunks(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

pub fn download_f32(sim: &Sim, a: u64, n: usize) -> Vec<f32> {
    download_u32(sim, a, n)
        .into_iter()
        .map(f32::from_bits)
        .collect()
}

pub fn download_u16(sim: &Sim, a: u64, n: usize) -> Vec<u16> {
    let mut b = vec![0u8; n * 2];
    sim.read(a, &mut b).expect("read");
    b.chunks(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect()
}

/// Nanoseconds this thread has run on a CPU (Linux `schedstat`), so that speed figures on a
/// shared machine leave out time spent waiting for a core. `None` elsewhere.
pub fn thread_cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Runs `f` and returns its result with (wall seconds, on-CPU seconds of this thread).
pub fn timed<R>(f: impl FnOnce() -> R) -> (R, f64, Option<f64>) {
    let c0 = thread_cpu_ns();
    let t = std::time::Instant::now();
    let r = f();
    let wall = t.elapsed().as_secs_f64();
    let cpu = match (c0, thread_cpu_ns()) {
        (Some(a), Some(b)) => Some((b - a) as f64 * 1e-9),
        _ => None,
    };
    (r, wall, cpu)
}
