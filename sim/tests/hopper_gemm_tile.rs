//! One 128 x 256 output tile of Lathe's Hopper GEMM (`kernels/src/hopper/ptx.rs`) replayed on
//! the simulator's Hopper functions: tensor maps encoded as `host/src/hopper_ops.rs` encodes
//! them (bf16 `(rows, k)` row-major, dims `[k, rows]`, stride `2k`, box `64 x box_rows`,
//! SWIZZLE_128B), per 64-wide K step one TMA box of A (64 x 128) into `A[s]` and one of B
//! (64 x 256) into `B[s]`, then for each of the two consumer warpgroups `c` four m64n256k16
//! with descriptors `(addr & 0x3FFFF) >> 4 | DESC_SWIZZLE_128B` at A rows `64c..`, +2 per k16,
//! scale-d 0 on the first K step of the tile. The tile sits on the ragged edge of the matrices,
//! so TMA's zero fill is exercised too. Checked against an f64 product (same bound as the
//! probes: `K * 2^-24 * sum |a * b|` per element).

use half::bf16;
use lathe_sim::SimError;
use lathe_sim::hopper::desc;
use lathe_sim::hopper::desc::Major;
use lathe_sim::hopper::tma::load_box;
use lathe_sim::hopper::wgmma::{ASource, MmaDtype, MmaOp, flops, mma_chunked};
use lathe_sim::tensor_map::{self, Swizzle, TensorMapDesc, TmaDtype};

/// The kernel's descriptor bits besides the address.
const DESC_SWIZZLE_128B: u64 = (1 << 62) | (64 << 32) | (1 << 16);
const BM: u32 = 128;
const BN: u32 = 256;
const BK: u32 = 64;

fn encode_k_major(addr: u64, rows: u64, k: u64, box_rows: u32) -> [u8; 128] {
    tensor_map::encode(&TensorMapDesc {
        dtype: TmaDtype::BF16,
        global_addr: addr,
        dims: vec![k, rows],
        strides: vec![2 * k],
        box_dims: vec![BK, box_rows],
        swizzle: Swizzle::B128,
    })
    .unwrap()
}

fn random(n: usize, seed: &mut u64) -> Vec<bf16> {
    (0..n)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            bf16::from_f32((*seed >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
        })
        .collect()
}

fn bytes(m: &[bf16]) -> Vec<u8> {
    m.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect()
}

#[test]
fn an_edge_tile_of_the_hopper_gemm() {
    let (m, n, k) = (200usize, 300usize, 128usize);
    let mut seed = 0x5eed_1234_abcd_ef01u64;
    let a = random(m * k, &mut seed);
    let b = random(n * k, &mut seed);
    let (ga, gb) = (bytes(&a), bytes(&b));
    let (addr_a, addr_b) = (0x7000_0000_0000u64, 0x7000_1000_0000u64);
    let tm_a = tensor_map::decode(&encode_k_major(addr_a, m as u64, k as u64, BM)).unwrap();
    let tm_b = tensor_map::decode(&encode_k_major(addr_b, n as u64, k as u64, BN)).unwrap();
    // The tile at (m0, n0) = (128, 256): rows 200.. of A and 300.. of B are out of bounds.
    let (m0, n0) = (128usize, 256usize);
    // Shared memory from an aligned base: A[s] at s * 16384, B[s] at 65536 + s * 32768.
    let base = 0x400u32;
    let mut smem = vec![0xAAu8; 0x40000];
    let mut d = [
        vec![f32::NAN; 64 * BN as usize],
        vec![f32::NAN; 64 * BN as usize],
    ];
    for kstep in 0..k / BK as usize {
        let s = (kstep % 4) as u32;
        let (sa, sb) = (base + s * 16384, base + 65536 + s * 32768);
        for (tm, addr, g, dst, row0) in [(&tm_a, addr_a, &ga, sa, m0), (&tm_b, addr_b, &gb, sb, n0)]
        {
            let coords = [(kstep * BK as usize) as i32, row0 as i32];
            let boxed = load_box(tm, &coords, dst, &mut |at, buf| {
                let o = (at - addr) as usize;
                buf.copy_from_slice(&g[o..o + buf.len()]);
                Ok(())
            })
            .unwrap();
            smem[dst as usize..dst as usize + boxed.len()].copy_from_slice(&boxed);
        }
        for (c, dc) in d.iter_mut().enumerate() {
            let a_addr = sa + c as u32 * 64 * 128;
            let mut da = ((a_addr & 262143) >> 4) as u64 | DESC_SWIZZLE_128B;
            let mut db = ((sb & 262143) >> 4) as u64 | DESC_SWIZZLE_128B;
            for kk in 0..4 {
                if kk > 0 {
                    da += 2;
                    db += 2;
                }
                let op = MmaOp {
                    n: BN,
                    dtype: MmaDtype::BF16,
                    a: ASource::Shared {
                        desc: desc::decode(da).unwrap(),
                        major: Major::K,
                    },
                    b: desc::decode(db).unwrap(),
                    b_major: Major::K,
                    scale_d: !(kstep == 0 && kk == 0),
                    scale_a: 1,
                    scale_b: 1,
                };
                let mut load = |at: u32| -> Result<[u8; 16], SimError> {
                    let mut chunk = [0u8; 16];
                    chunk.copy_from_slice(&smem[at as usize..at as usize + 16]);
                    Ok(chunk)
                };
                mma_chunked(&op, &mut load, dc).unwrap();
            }
        }
    }
    let mut checked = 0;
    for (c, dc) in d.iter().enumerate() {
        for i in 0..64 {
            for j in 0..BN as usize {
                let (row, col) = (m0 + 64 * c + i, n0 + j);
                let got = dc[i * BN as usize + j];
                if row >= m || col >= n {
                    assert_eq!(got, 0.0, "zero-filled ({row}, {col})");
                    continue;
                }
                let (mut exact, mut abs) = (0f64, 0f64);
                for kk in 0..k {
                    let p = a[row * k + kk].to_f64() * b[col * k + kk].to_f64();
                    exact += p;
                    abs += p.abs();
                }
                let bound = k as f64 * abs / (1u64 << 24) as f64;
                assert!((got as f64 - exact).abs() <= bound, "({row}, {col})");
                checked += 1;
            }
        }
    }
    assert_eq!(checked, (m - m0) * (n - n0));
    assert_eq!(flops(BN) * 4 * 2 * 2, 2 * 128 * 256 * 128, "a tile's FLOPs");
}
