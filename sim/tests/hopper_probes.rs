//! The H100 probe kernels (`docs/probes/wgmma.ptx`, `tma.ptx`) replayed on the simulator's
//! Hopper functions: each test does to shared memory exactly what the probe kernel does, runs
//! its four `wgmma.mma_async m64n64k16` steps through `lathe_sim::hopper::wgmma::mma`, stores
//! the accumulator registers as its epilogue does, and checks the stored D against an f64
//! product of the same random bf16 inputs. The probes that ran right on
//! the H100 must come out right here, and `wg_core_lbo1024`, which ran WRONG there, must come
//! out wrong here too.
//!
//! Tolerance: D = A * B^T with K = 64, summed in f32. A sum of K exact products in f32 is off
//! from the exact sum by at most `K * 2^-24 * sum_k |a_ik * b_jk|` (the standard bound for
//! recursive summation), so that is the check, per element. On these inputs the bound is about
//! 1e-5; the H100 itself was off by at most 2.7e-7 on its (smaller) inputs.

use half::bf16;
use lathe_sim::SimError;
use lathe_sim::hopper::desc::{self, Major};
use lathe_sim::hopper::tma::load_box;
use lathe_sim::hopper::wgmma::{ASource, MmaDtype, MmaOp, mma, scatter_accumulators};
use lathe_sim::tensor_map::{self, Swizzle, TensorMapDesc, TmaDtype};

const N: usize = 64;
const K: usize = 64;
/// Shared addresses of the probes' `sA` and `sB` (`.shared .align 1024 .b8 [8192]` each).
const SA: u32 = 0x400;
const SB: u32 = 0x2400;
const SMEM: usize = 0x4400;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// A bf16 uniform in [-1, 1).
    fn bf16(&mut self) -> bf16 {
        bf16::from_f32((self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
    }
}

/// A 64 x 64 bf16 matrix, row-major, as the bytes the probe's global buffer holds.
fn random_matrix(rng: &mut Rng) -> (Vec<bf16>, Vec<u8>) {
    let m: Vec<bf16> = (0..N * K).map(|_| rng.bf16()).collect();
    let bytes = m.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect();
    (m, bytes)
}

/// The probes' staging: thread-chunk `c` (0..512) is 16 bytes of global row `c / 8`, K chunk
/// `c % 8`, stored at the shared offset the probe's PTX computes for `layout`.
fn stage(layout: &str, global: &[u8], smem: &mut [u8], base: u32) {
    for c in 0..512usize {
        let (row, chunk) = (c / 8, c % 8);
        let off = match layout {
            "swz128" => row * 128 + ((chunk ^ (row % 8)) * 16),
            _ => ((row / 8) * 8 + chunk) * 128 + (row % 8) * 16,
        };
        let dst = base as usize + off;
        smem[dst..dst + 16].copy_from_slice(&global[c * 16..c * 16 + 16]);
    }
}

/// The probes' descriptor, built as their PTX builds it: `(addr & 0x3FFFF) >> 4` or'ed with
/// SBO >> 4 at bit 32, LBO >> 4 at bit 16 and the swizzle code at bit 62.
fn probe_desc(addr: u32, lbo: u64, sbo: u64, swz: u64) -> u64 {
    let hi = ((sbo >> 4) << 32) | ((lbo >> 4) << 16) | (swz << 62);
    ((addr as u64 & 262143) >> 4) | hi
}

/// The probes' four wgmma steps: D = 0, then for each k16 step one m64n64k16 with scale-d = 1
/// and both descriptors advanced by `kstep_bytes >> 4` (a raw add on the 64-bit value).
fn wgmma_steps(smem: &[u8], lbo: u64, sbo: u64, swz: u64, kstep_bytes: u64) -> Vec<f32> {
    let mut da = probe_desc(SA, lbo, sbo, swz);
    let mut db = probe_desc(SB, lbo, sbo, swz);
    let mut d = vec![0f32; 64 * N];
    let mut load = |addr: u32| -> Result<u16, SimError> {
        let a = addr as usize;
        Ok(u16::from_le_bytes([smem[a], smem[a + 1]]))
    };
    for _ in 0..4 {
        let op = MmaOp {
            n: N as u32,
            dtype: MmaDtype::BF16,
            a: ASource::Shared {
                desc: desc::decode(da).unwrap(),
                major: Major::K,
            },
            b: desc::decode(db).unwrap(),
            b_major: Major::K,
            scale_d: true,
            scale_a: 1,
            scale_b: 1,
        };
        mma(&op, &mut load, &mut d).unwrap();
        da += kstep_bytes >> 4;
        db += kstep_bytes >> 4;
    }
    d
}

/// The probes' epilogue: thread `tid` of the warpgroup holds the accumulators in registers
/// (`scatter_accumulators`), and stores `{d[i], d[i+1]}` at row `16w + lane/4`, column
/// `8(i/4) + 2(lane%4)` and `{d[i+2], d[i+3]}` 8 rows below, for i = 0, 4, .., as the probe's
/// `st.global.v2.f32` do. Returns the 64 x 64 global D (NaN where nothing was stored).
fn probe_store(d: &[f32]) -> Vec<f32> {
    let nreg = N / 2;
    let mut regs = vec![0f32; 128 * nreg];
    scatter_accumulators(N as u32, d, &mut regs).unwrap();
    let mut out = vec![f32::NAN; 64 * N];
    for tid in 0..128 {
        let (w, lane) = (tid / 32, tid % 32);
        let (g, t) = (lane / 4, lane % 4);
        let base = (16 * w + g) * N + 2 * t;
        let r = &regs[tid * nreg..(tid + 1) * nreg];
        for i in (0..nreg).step_by(4) {
            let col8 = i / 4;
            out[base + col8 * 8] = r[i];
            out[base + col8 * 8 + 1] = r[i + 1];
            out[base + 8 * N + col8 * 8] = r[i + 2];
            out[base + 8 * N + col8 * 8 + 1] = r[i + 3];
        }
    }
    out
}

/// The probe: its wgmma steps, then its stores from the accumulator registers.
fn run_wgmma(smem: &[u8], lbo: u64, sbo: u64, swz: u64, kstep_bytes: u64) -> Vec<f32> {
    let d = wgmma_steps(smem, lbo, sbo, swz, kstep_bytes);
    let out = probe_store(&d);
    assert!(out.iter().all(|v| !v.is_nan()), "the stores cover D");
    out
}

/// Max |d - ref| and whether every element is within the f32 summation bound.
fn compare(a: &[bf16], b: &[bf16], d: &[f32]) -> (f64, bool) {
    let mut max_err = 0f64;
    let mut ok = true;
    for i in 0..64 {
        for j in 0..N {
            let (mut exact, mut abs) = (0f64, 0f64);
            for k in 0..K {
                let p = a[i * K + k].to_f64() * b[j * K + k].to_f64();
                exact += p;
                abs += p.abs();
            }
            let err = (d[i * N + j] as f64 - exact).abs();
            max_err = max_err.max(err);
            ok &= err <= K as f64 * f32::EPSILON as f64 / 2.0 * abs;
        }
    }
    (max_err, ok)
}

fn inputs(seed: u64) -> (Vec<bf16>, Vec<u8>, Vec<bf16>, Vec<u8>) {
    let mut rng = Rng(seed);
    let (a, ga) = random_matrix(&mut rng);
    let (b, gb) = random_matrix(&mut rng);
    (a, ga, b, gb)
}

#[test]
fn wg_swz128_matches_the_f64_product() {
    for seed in [0x9e37_79b9_7f4a_7c15, 7, 12345] {
        let (a, ga, b, gb) = inputs(seed);
        let mut smem = vec![0u8; SMEM];
        stage("swz128", &ga, &mut smem, SA);
        stage("swz128", &gb, &mut smem, SB);
        let d = run_wgmma(&smem, 16, 1024, 1, 32);
        let (err, ok) = compare(&a, &b, &d);
        assert!(ok, "wg_swz128: max abs err {err:e} over the f32 bound");
        assert!(err < 2e-5, "wg_swz128: max abs err {err:e}");
    }
}

#[test]
fn wg_core_lbo128_matches_the_f64_product() {
    let (a, ga, b, gb) = inputs(99);
    let mut smem = vec![0u8; SMEM];
    stage("core", &ga, &mut smem, SA);
    stage("core", &gb, &mut smem, SB);
    let d = run_wgmma(&smem, 128, 1024, 0, 256);
    let (err, ok) = compare(&a, &b, &d);
    assert!(ok, "wg_core_lbo128: max abs err {err:e} over the f32 bound");
}

#[test]
fn wg_core_lbo1024_comes_out_wrong_as_on_the_h100() {
    let (a, ga, b, gb) = inputs(99);
    let mut smem = vec![0u8; SMEM];
    stage("core", &ga, &mut smem, SA);
    stage("core", &gb, &mut smem, SB);
    let d = run_wgmma(&smem, 1024, 128, 0, 256);
    let (err, ok) = compare(&a, &b, &d);
    assert!(!ok, "LBO/SBO swapped must not give the product");
    assert!(err > 0.1, "LBO/SBO swapped: max abs err only {err:e}");
}

#[test]
fn tma_wg_matches_the_f64_product_and_the_hand_swizzle() {
    let (a, ga, b, gb) = inputs(0xdead_beef);
    // Two global buffers at device-like addresses.
    let (addr_a, addr_b) = (0x7f00_0000_0000u64, 0x7f00_0001_0000u64);
    let map = |addr| TensorMapDesc {
        dtype: TmaDtype::BF16,
        global_addr: addr,
        dims: vec![64, 64],
        strides: vec![128],
        box_dims: vec![64, 64],
        swizzle: Swizzle::B128,
    };
    let mut smem = vec![0u8; SMEM];
    for (addr, global, dst) in [(addr_a, &ga, SA), (addr_b, &gb, SB)] {
        // The kernel receives the 128-byte blob; the interpreter decodes it.
        let blob = tensor_map::encode(&map(addr)).unwrap();
        let tm = tensor_map::decode(&blob).unwrap();
        let mut reads = 0;
        let bytes = load_box(&tm, &[0, 0], dst, &mut |g, buf| {
            reads += 1;
            let off = (g - addr) as usize;
            buf.copy_from_slice(&global[off..off + buf.len()]);
            Ok(())
        })
        .unwrap();
        assert_eq!(
            bytes.len(),
            8192,
            "expect_tx 16384 covers two 8192-byte boxes"
        );
        assert_eq!(
            reads, 1,
            "a box of whole contiguous rows is one global read"
        );
        smem[dst as usize..dst as usize + 8192].copy_from_slice(&bytes);
    }
    // TMA's 128B swizzle is exactly the probe's hand swizzle.
    let mut hand = vec![0u8; SMEM];
    stage("swz128", &ga, &mut hand, SA);
    stage("swz128", &gb, &mut hand, SB);
    assert!(
        smem == hand,
        "TMA SWIZZLE_128B differs from chunk ^ (row % 8)"
    );
    let d = run_wgmma(&smem, 16, 1024, 1, 32);
    let (err, ok) = compare(&a, &b, &d);
    assert!(ok, "tma_wg: max abs err {err:e} over the f32 bound");
}

#[test]
fn probe_descriptor_constant_decodes_to_its_fields() {
    // The `or.b64` immediate of tma.ptx: SBO 1024, LBO 16, 128B swizzle.
    let d = desc::decode(4611686293305360384).unwrap();
    assert_eq!((d.start, d.lbo, d.sbo), (0, 16, 1024));
    assert_eq!(d.swizzle, Swizzle::B128);
    assert_eq!(d.base_offset, 0);
}
