//! Simulator tests of the fused causal attention against its f64 twin: forward (y, lse), the
//! row dot, and the two backward passes, on random inputs with every output poisoned, at
//! sequence lengths that are not multiples of the 64-token tile and at head sizes below the
//! padded one.

use super::flash::{self, twin};
use crate::desc::Elem;
use crate::elementwise::twin::Float;
use crate::rng::Rng;
use crate::simtest::{Arg, Gpu};
use crate::tolerance::{check_close, rel_tolerance};
use half::bf16;

fn random<T: Float>(rng: &mut Rng, n: usize, lo: f32, hi: f32) -> Vec<T> {
    (0..n).map(|_| T::from_f32(rng.range_f32(lo, hi))).collect()
}

fn f64s<T: Float>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f32() as f64).collect()
}

struct Run {
    y: Vec<f64>,
    lse: Vec<f64>,
    dvec: Vec<f64>,
    dqkv: Vec<f64>,
    /// Bank conflicts of the forward, dQ and dK/dV launches.
    conflicts: [u64; 3],
}

fn run<T: Float + bytemuck::Pod>(e: Elem, s: &twin::Shape, qkv: &[T], dy: &[T]) -> Run {
    let k = flash::pick(e, s.hs).expect("supported shape");
    let p = flash::problem(s.b, s.t, s.nh, s.hs);
    let c = s.nh * s.hs;
    let scale = 1.0 / (s.hs as f32).sqrt();
    let mut gpu = Gpu::new();
    let dq = gpu.upload(qkv);
    let ddy = gpu.upload(dy);
    let sz = std::mem::size_of::<T>();
    let ny = s.b * s.t * c;
    let nl = s.b * s.nh * s.t;
    let y = gpu.alloc_bytes(ny * sz);
    let lse = gpu.alloc_bytes(nl * 4);
    let dvec = gpu.alloc_bytes(nl * 4);
    let dqkv = gpu.alloc_bytes(3 * ny * sz);
    let dims = [
        Arg::U32(s.t as u32),
        Arg::U32(s.nh as u32),
        Arg::U32(s.hs as u32),
    ];
    let mut fwd = vec![Arg::Ptr(dq), Arg::Ptr(y), Arg::Ptr(lse)];
    fwd.extend(dims);
    fwd.push(Arg::F32(scale));
    let cf = gpu.launch(k.forward, &p, &fwd).expect("forward launch");
    let mut dot = vec![
        Arg::Ptr(y),
        Arg::Ptr(ddy),
        Arg::Ptr(dvec),
        Arg::U32(nl as u32),
    ];
    dot.extend(dims);
    gpu.launch(k.row_dot, &p, &dot).expect("row dot launch");
    let mut bwd = vec![
        Arg::Ptr(dq),
        Arg::Ptr(ddy),
        Arg::Ptr(lse),
        Arg::Ptr(dvec),
        Arg::Ptr(dqkv),
    ];
    bwd.extend(dims);
    bwd.push(Arg::F32(scale));
    let cq = gpu.launch(k.dq, &p, &bwd).expect("dQ launch");
    let ckv = gpu.launch(k.dkdv, &p, &bwd).expect("dK/dV launch");
    Run {
        y: f64s(&gpu.read::<T>(y, ny)),
        lse: gpu.read::<f32>(lse, nl).iter().map(|&x| x as f64).collect(),
        dvec: gpu
            .read::<f32>(dvec, nl)
            .iter()
            .map(|&x| x as f64)
            .collect(),
        dqkv: f64s(&gpu.read::<T>(dqkv, 3 * ny)),
        conflicts: [cf, cq, ckv].map(|c| c.shared_bank_conflicts),
    }
}

fn case<T: Float + bytemuck::Pod>(e: Elem, b: usize, t: usize, nh: usize, hs: usize) {
    let s = twin::Shape { b, t, nh, hs };
    let c = nh * hs;
    let mut rng = Rng::new((b * 1000 + t * 10 + hs) as u64);
    let qkv: Vec<T> = random(&mut rng, b * t * 3 * c, -2.0, 2.0);
    let dy: Vec<T> = random(&mut rng, b * t * c, -1.0, 1.0);
    let got = run(e, &s, &qkv, &dy);
    let what = format!("flash attention {e:?} B={b} T={t} nh={nh} hs={hs}");
    let tol = rel_tolerance(e);
    let (y, lse) = twin::forward(&s, &qkv);
    check_close(&format!("{what} y"), &got.y, &y, tol).unwrap();
    // lse is f32 arithmetic on rounded scores: relative to its size.
    check_close(&format!("{what} lse"), &got.lse, &lse, tol).unwrap();
    // The row dot of the kernel's own y (what the backward uses).
    let yk: Vec<T> = got.y.iter().map(|&v| T::from_f32(v as f32)).collect();
    let dvec = twin::row_dot(&s, &yk, &dy);
    check_close(&format!("{what} D"), &got.dvec, &dvec, 1e-5).unwrap();
    let dqkv = twin::backward(&s, &qkv, &dy);
    let part = |v: &[f64], p: usize| -> Vec<f64> {
        v.chunks(3 * c)
            .flat_map(|r| r[p * c..(p + 1) * c].to_vec())
            .collect()
    };
    for (p, name) in ["dq", "dk", "dv"].iter().enumerate() {
        check_close(
            &format!("{what} {name}"),
            &part(&got.dqkv, p),
            &part(&dqkv, p),
            tol,
        )
        .unwrap();
    }
    assert_eq!(
        got.conflicts, [0; 3],
        "{what}: shared-memory bank conflicts"
    );
}

#[test]
fn flash_attention_matches_twin_bf16() {
    // hs 8 pads to 32; T = 70 has a partial second tile; B and heads > 1.
    case::<bf16>(Elem::BF16, 2, 70, 2, 8);
    // hs 64, two full tiles and a tail.
    case::<bf16>(Elem::BF16, 1, 133, 1, 64);
    // hs 40 pads to 64; a single short tile.
    case::<bf16>(Elem::BF16, 1, 9, 3, 40);
}

#[test]
fn flash_attention_matches_twin_f16() {
    case::<half::f16>(Elem::F16, 1, 65, 2, 32);
    case::<half::f16>(Elem::F16, 2, 31, 1, 56);
}
