//! Deterministic data-parallel helpers.
//!
//! Work is cut into chunks whose boundaries depend only on the sizes involved (never on the
//! number of threads), and each output element is produced by exactly one chunk, so a parallel
//! run computes the same bits as a serial one.

use rayon::prelude::*;

/// Elements per chunk for elementwise kernels.
pub(crate) const CHUNK: usize = 16 * 1024;

/// Rows per chunk when each row has `row_len` elements (at least one row).
pub(crate) fn rows_per_chunk(row_len: usize) -> usize {
    (CHUNK / row_len.max(1)).max(1)
}

// `f` is `Copy` and copied into a local before each inner loop: the captured constants then live
// in registers, and the loop vectorises (read through a reference, they are reloaded every
// iteration because the stores might alias them).

#[inline(always)]
fn map1_loop<T: Copy>(o: &mut [T], a: &[T], f: impl Fn(T) -> T + Copy) {
    for (o, &a) in o.iter_mut().zip(a) {
        *o = f(a);
    }
}

#[inline(always)]
fn map2_loop<T: Copy>(o: &mut [T], a: &[T], b: &[T], f: impl Fn(T, T) -> T + Copy) {
    let b = &b[..a.len()];
    for (i, o) in o.iter_mut().enumerate().take(a.len()) {
        *o = f(a[i], b[i]);
    }
}

// The loops below are also compiled with AVX2 enabled and picked at run time when the CPU has
// it (8 floats per instruction instead of SSE2's 4). Only instruction selection changes: each
// element goes through the same IEEE operations (no FMA contraction), so the results are
// identical either way.

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn map1_avx2<T: Copy>(o: &mut [T], a: &[T], f: impl Fn(T) -> T + Copy) {
    map1_loop(o, a, f)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn map2_avx2<T: Copy>(o: &mut [T], a: &[T], b: &[T], f: impl Fn(T, T) -> T + Copy) {
    map2_loop(o, a, b, f)
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

// `f` is `Copy` and passed by value into the loops: captured constants then live in registers
// and the loop vectorises (read through a reference they are reloaded every iteration, since
// the stores might alias them). Pass `#[inline(always)]` fn items for heavy bodies.

/// `out[i] = f(a[i])`, in parallel chunks.
pub(crate) fn map1<T: Copy + Send + Sync>(
    out: &mut [T],
    a: &[T],
    f: impl Fn(T) -> T + Sync + Copy,
) {
    debug_assert_eq!(out.len(), a.len());
    let avx2 = has_avx2();
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK))
        .for_each(|(o, a)| {
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: map1_avx2 only requires AVX2, which the CPU was checked to have.
                return unsafe { map1_avx2(o, a, f) };
            }
            let _ = avx2;
            map1_loop(o, a, f)
        });
}

/// `out[i] = f(a[i], b[i])`, in parallel chunks.
pub(crate) fn map2<T: Copy + Send + Sync>(
    out: &mut [T],
    a: &[T],
    b: &[T],
    f: impl Fn(T, T) -> T + Sync + Copy,
) {
    debug_assert_eq!(out.len(), a.len());
    debug_assert_eq!(out.len(), b.len());
    let avx2 = has_avx2();
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(o, (a, b))| {
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: map2_avx2 only requires AVX2, which the CPU was checked to have.
                return unsafe { map2_avx2(o, a, b, f) };
            }
            let _ = avx2;
            map2_loop(o, a, b, f)
        });
}

/// A raw pointer that may cross threads. Used only where tasks write provably disjoint parts
/// of one buffer that a safe split cannot express (strided column blocks); each use carries its
/// own SAFETY argument.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub *mut T);

impl<T> SendPtr<T> {
    /// The pointer (a method, so closures capture the whole `SendPtr`, not its field).
    pub fn get(self) -> *mut T {
        self.0
    }
}
// SAFETY: SendPtr is only a carrier; every dereference site guarantees exclusive, in-bounds
// access to the elements it touches while the owning borrow is alive.
unsafe impl<T: Send> Send for SendPtr<T> {}
// SAFETY: as above; shared copies never touch the same element.
unsafe impl<T: Send> Sync for SendPtr<T> {}

/// Column sums of a row-major `(rows, cols)` matrix into `out` (cols): `out[j] = sum_r m[r, j]`,
/// rows added in order. Parallel over blocks of columns, so each sum has one fixed order.
pub(crate) fn col_sums<T: crate::scalar::Scalar>(m: &[T], rows: usize, cols: usize, out: &mut [T]) {
    debug_assert_eq!(m.len(), rows * cols);
    debug_assert_eq!(out.len(), cols);
    const BLOCK: usize = 64;
    out.par_chunks_mut(BLOCK).enumerate().for_each(|(bi, o)| {
        let j0 = bi * BLOCK;
        o.fill(T::ZERO);
        for r in 0..rows {
            let row = &m[r * cols + j0..r * cols + j0 + o.len()];
            for (acc, &x) in o.iter_mut().zip(row) {
                *acc += x;
            }
        }
    });
}

/// Lanes of the fixed-order reductions below.
const LANES: usize = 8;

/// Combines the lanes in a fixed tree order.
#[inline(always)]
fn combine<T: crate::scalar::Scalar>(a: [T; LANES]) -> T {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

/// `sum_i f(i)` for `i in 0..n`, in 8 interleaved partial sums combined in a fixed tree: the
/// order depends only on `n`, and the loop vectorises (a single running sum cannot, since float
/// addition is not associative).
#[inline(always)]
pub(crate) fn sum_by<T: crate::scalar::Scalar>(n: usize, f: impl Fn(usize) -> T + Copy) -> T {
    let mut acc = [T::ZERO; LANES];
    let full = n - n % LANES;
    let mut i = 0;
    while i < full {
        for (l, a) in acc.iter_mut().enumerate() {
            *a += f(i + l);
        }
        i += LANES;
    }
    for (l, a) in acc.iter_mut().enumerate().take(n - full) {
        *a += f(full + l);
    }
    combine(acc)
}

/// Sum of `xs` (see [`sum_by`]).
#[inline(always)]
pub(crate) fn sum<T: crate::scalar::Scalar>(xs: &[T]) -> T {
    sum_by(xs.len(), |i| xs[i])
}

/// Dot product of equal-length slices (see [`sum_by`]).
#[inline(always)]
pub(crate) fn dot<T: crate::scalar::Scalar>(a: &[T], b: &[T]) -> T {
    let b = &b[..a.len()];
    sum_by(a.len(), |i| a[i] * b[i])
}

/// Largest element of a non-empty slice (NaN-ignoring like `f32::max`; the result does not
/// depend on the order).
#[inline(always)]
pub(crate) fn max<T: crate::scalar::Scalar>(xs: &[T]) -> T {
    let mut acc = [xs[0]; LANES];
    let full = xs.len() - xs.len() % LANES;
    for c in xs[..full].chunks_exact(LANES) {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = if x > *a { x } else { *a };
        }
    }
    for &x in &xs[full..] {
        acc[0] = if x > acc[0] { x } else { acc[0] };
    }
    acc.iter()
        .copied()
        .fold(acc[0], |m, x| if x > m { x } else { m })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scalar::exp_f32;
    use lathe_kernels::rng::Rng;

    #[test]
    fn avx2_loops_give_the_same_bits_as_the_portable_ones() {
        let mut rng = Rng::new(1);
        let a = rng.vec_f32(1003, -30.0, 30.0);
        let b = rng.vec_f32(1003, -3.0, 3.0);
        let f1 = |x: f32| x * (1.0 / (1.0 + exp_f32(-x)));
        let f2 = |x: f32, y: f32| exp_f32(x * 0.5 - y) / (1.0 + y * y);
        let (mut p1, mut p2) = (vec![0f32; a.len()], vec![0f32; a.len()]);
        map1_loop(&mut p1, &a, f1);
        map2_loop(&mut p2, &a, &b, f2);
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            let (mut v1, mut v2) = (vec![0f32; a.len()], vec![0f32; a.len()]);
            // SAFETY: AVX2 presence was checked.
            unsafe {
                map1_avx2(&mut v1, &a, f1);
                map2_avx2(&mut v2, &a, &b, f2);
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&p1), bits(&v1));
            assert_eq!(bits(&p2), bits(&v2));
        }
        let mut o = vec![0f32; a.len()];
        map2(&mut o, &a, &b, f2);
        assert!(o.iter().zip(&p2).all(|(x, y)| x.to_bits() == y.to_bits()));
    }

    #[test]
    fn lane_reductions_are_exact_on_integers_and_handle_tails() {
        for n in [1usize, 7, 8, 9, 31, 100] {
            let xs: Vec<f64> = (0..n).map(|i| i as f64).collect();
            assert_eq!(sum(&xs), (n * (n - 1) / 2) as f64);
            assert_eq!(dot(&xs, &xs), (0..n).map(|i| (i * i) as f64).sum::<f64>());
            assert_eq!(max(&xs), (n - 1) as f64);
        }
        let m = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let mut c = [0f32; 3];
        col_sums(&m, 2, 3, &mut c);
        assert_eq!(c, [5.0, 7.0, 9.0]);
    }
}
