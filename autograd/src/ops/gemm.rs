//! Strided GEMM on top of matrixmultiply, with a deterministic parallel split.
//!
//! `alpha` is always 1 (scales are applied outside) so that a C element's arithmetic is the same
//! whichever micro-tile it falls in. Parallel calls split C into blocks of rows or of columns
//! whose boundaries depend only on (m, k, n); the reduction over k of every element is done by one
//! call, in order, so the split never changes the result.

use rayon::prelude::*;

use crate::ops::par::SendPtr;
use crate::scalar::Scalar;

/// A read-only strided matrix operand: element (i, j) is `data[off + i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MatRef<'a, T> {
    pub data: &'a [T],
    pub off: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> MatRef<'a, T> {
    /// A row-major `(rows, cols)` matrix starting at `off`.
    pub fn rm(data: &'a [T], off: usize, cols: usize) -> Self {
        MatRef {
            data,
            off,
            rs: cols,
            cs: 1,
        }
    }
    /// A strided matrix.
    pub fn strided(data: &'a [T], off: usize, rs: usize, cs: usize) -> Self {
        MatRef { data, off, rs, cs }
    }
    /// The transpose (a view: strides swapped).
    pub fn t(self) -> Self {
        MatRef {
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
    /// The sub-matrix starting at row `r`, column `c`.
    pub fn at(self, r: usize, c: usize) -> Self {
        MatRef {
            off: self.off + r * self.rs + c * self.cs,
            ..self
        }
    }
    fn check(&self, rows: usize, cols: usize) {
        if rows > 0 && cols > 0 {
            let last = self.off + (rows - 1) * self.rs + (cols - 1) * self.cs;
            assert!(last < self.data.len(), "gemm operand out of bounds");
        }
    }
}

/// `C = A (m, k) * B (k, n)` (`accumulate`: `C += A * B`) into a strided C of `c`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm<T: Scalar>(
    m: usize,
    k: usize,
    n: usize,
    a: MatRef<T>,
    b: MatRef<T>,
    c: &mut [T],
    c_off: usize,
    rsc: usize,
    csc: usize,
    accumulate: bool,
) {
    a.check(m, k);
    b.check(k, n);
    MatRef::strided(&*c, c_off, rsc, csc).check(m, n);
    if m == 0 || n == 0 {
        return;
    }
    let beta = if accumulate { T::ONE } else { T::ZERO };
    // SAFETY: the three checks above prove every addressed element is in bounds; `c` is a
    // unique borrow, so C does not alias A or B and nobody else touches it during the call.
    unsafe {
        T::gemm(
            m,
            k,
            n,
            T::ONE,
            a.data.as_ptr().add(a.off),
            a.rs as isize,
            a.cs as isize,
            b.data.as_ptr().add(b.off),
            b.rs as isize,
            b.cs as isize,
            beta,
            c.as_mut_ptr().add(c_off),
            rsc as isize,
            csc as isize,
        )
    }
}

/// Smallest block (rows or columns) a parallel split produces.
const MIN_BLOCK: usize = 32;
/// Work (multiply-adds) per block the split aims for.
const WORK_PER_BLOCK: usize = 1 << 20;
/// Most blocks one call is split into.
const MAX_BLOCKS: usize = 4;

/// `C = A (m, k) * B (k, n)` into a contiguous row-major `c` (m, n), split across threads.
///
/// The split runs along m (A re-used, B re-packed per block) or along n (the reverse), whichever
/// re-packs the smaller operand.
pub(crate) fn par_gemm<T: Scalar>(
    m: usize,
    k: usize,
    n: usize,
    a: MatRef<T>,
    b: MatRef<T>,
    c: &mut [T],
    accumulate: bool,
) {
    assert!(c.len() >= m * n, "gemm output too small");
    let work = m * k * n;
    let split_rows = m >= n;
    let dim = if split_rows { m } else { n };
    let blocks = (work / WORK_PER_BLOCK)
        .min(dim / MIN_BLOCK)
        .clamp(1, MAX_BLOCKS);
    if blocks == 1 {
        gemm(m, k, n, a, b, c, 0, n, 1, accumulate);
        return;
    }
    let step = dim.div_ceil(blocks);
    if split_rows {
        c[..m * n]
            .par_chunks_mut(step * n)
            .enumerate()
            .for_each(|(i, cb)| {
                let rows = cb.len() / n;
                gemm(rows, k, n, a.at(i * step, 0), b, cb, 0, n, 1, accumulate);
            });
    } else {
        a.check(m, k);
        b.check(k, n);
        let beta = if accumulate { T::ONE } else { T::ZERO };
        let cp = SendPtr(c.as_mut_ptr());
        (0..blocks).into_par_iter().for_each(|i| {
            let j0 = i * step;
            let cols = step.min(n.saturating_sub(j0));
            if cols == 0 {
                return;
            }
            let bb = b.at(0, j0);
            // SAFETY: A and B were bounds-checked for the full (m, k) and (k, n) shapes, and this
            // block addresses columns j0..j0+cols < n of each; C is (m, n) row-major with
            // c.len() >= m*n (asserted), and blocks own disjoint column ranges, so no element is
            // written by two tasks. `c` stays mutably borrowed for the whole parallel loop.
            unsafe {
                T::gemm(
                    m,
                    k,
                    cols,
                    T::ONE,
                    a.data.as_ptr().add(a.off),
                    a.rs as isize,
                    a.cs as isize,
                    bb.data.as_ptr().add(bb.off),
                    bb.rs as isize,
                    bb.cs as isize,
                    beta,
                    cp.get().add(j0),
                    n as isize,
                    1,
                )
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lathe_kernels::rng::Rng;

    fn naive(m: usize, k: usize, n: usize, a: &[f64], b: &[f64]) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn par_gemm_matches_naive_and_serial_bitwise() {
        let mut rng = Rng::new(5);
        for &(m, k, n) in &[
            (3, 5, 7),
            (300, 64, 40),
            (40, 64, 300),
            (257, 129, 65),
            (96, 1100, 80),
        ] {
            let a: Vec<f64> = (0..m * k).map(|_| rng.normal() as f64).collect();
            let b: Vec<f64> = (0..k * n).map(|_| rng.normal() as f64).collect();
            let mut c = vec![0.0; m * n];
            par_gemm(
                m,
                k,
                n,
                MatRef::rm(&a, 0, k),
                MatRef::rm(&b, 0, n),
                &mut c,
                false,
            );
            let r = naive(m, k, n, &a, &b);
            for (x, y) in c.iter().zip(&r) {
                assert!((x - y).abs() < 1e-10 * (1.0 + y.abs()));
            }
            let af: Vec<f32> = a.iter().map(|&x| x as f32).collect();
            let bf: Vec<f32> = b.iter().map(|&x| x as f32).collect();
            let mut c1 = vec![0f32; m * n];
            let mut c2 = vec![0f32; m * n];
            par_gemm(
                m,
                k,
                n,
                MatRef::rm(&af, 0, k),
                MatRef::rm(&bf, 0, n),
                &mut c1,
                false,
            );
            gemm(
                m,
                k,
                n,
                MatRef::rm(&af, 0, k),
                MatRef::rm(&bf, 0, n),
                &mut c2,
                0,
                n,
                1,
                false,
            );
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&c1),
                bits(&c2),
                "split changed results for {m}x{k}x{n}"
            );
        }
    }
}
