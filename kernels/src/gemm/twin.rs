//! The GEMM kernels' CPU twin: the same function in f64, straight from the definition.
//!
//! `C = act(alpha * op(A) op(B) + beta * C_old + bias)` with `act` GELU (tanh form) or the
//! identity; inputs are the 16-bit values the kernels read (converted exactly), products and
//! sums in f64, no rounding of the result (the test compares the kernel's rounded output against
//! it under the dtype tolerance).

use super::{Gemm, Op};
use crate::elementwise::twin::Float;

/// GPT-2's GELU, tanh form: `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
pub fn gelu(x: f64) -> f64 {
    let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
    0.5 * x * (1.0 + u.tanh())
}

/// The reference values of the requested rows of C: `rows.len() x g.n` values, row-major.
/// `c_old` (the stored C, with `g.ldc()`) is read only when `g.beta != 0`; `bias` has length
/// `g.n`. Computing a subset of rows keeps large checks cheap.
///
/// # Panics
/// When a slice is shorter than `g` requires, or a row is `>= g.m` (a bug in the calling test).
pub fn reference<T: Float, O: Float>(
    g: &Gemm,
    a: &[T],
    b: &[T],
    bias: Option<&[T]>,
    c_old: &[O],
    rows: &[usize],
) -> Vec<f64> {
    assert!(
        a.len() >= g.a_len(),
        "A has {} elements, needs {}",
        a.len(),
        g.a_len()
    );
    assert!(
        b.len() >= g.b_len(),
        "B has {} elements, needs {}",
        b.len(),
        g.b_len()
    );
    if g.beta != 0.0 {
        assert!(
            c_old.len() >= g.c_len(),
            "C has {} elements, needs {}",
            c_old.len(),
            g.c_len()
        );
    }
    if let Some(bias) = bias {
        assert!(
            bias.len() >= g.n,
            "bias has {} elements, needs {}",
            bias.len(),
            g.n
        );
    }
    let (lda, ldb, ldc) = (g.lda(), g.ldb(), g.ldc());
    let (n, k) = (g.n, g.k);
    // op(B)^T as (n, k) f64 rows, so each dot product runs over contiguous memory.
    let mut bt = vec![0f64; n * k];
    for j in 0..n {
        for p in 0..k {
            let v = match g.op_b {
                Op::N => b[p * ldb + j],
                Op::T => b[j * ldb + p],
            };
            bt[j * k + p] = v.to_f32() as f64;
        }
    }
    let mut out = Vec::with_capacity(rows.len() * n);
    let mut arow = vec![0f64; k];
    for &i in rows {
        assert!(i < g.m, "row {i} >= m = {}", g.m);
        for (p, x) in arow.iter_mut().enumerate() {
            let v = match g.op_a {
                Op::N => a[i * lda + p],
                Op::T => a[p * lda + i],
            };
            *x = v.to_f32() as f64;
        }
        for j in 0..n {
            let dot: f64 = arow
                .iter()
                .zip(&bt[j * k..(j + 1) * k])
                .map(|(x, y)| x * y)
                .sum();
            let mut v = g.alpha as f64 * dot;
            if g.beta != 0.0 {
                v += g.beta as f64 * c_old[i * ldc + j].to_f32() as f64;
            }
            if let Some(bias) = bias {
                v += bias[j].to_f32() as f64;
            }
            if g.gelu {
                v = gelu(v);
            }
            out.push(v);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    #[test]
    fn small_product_by_hand() {
        // A (2, 3) = [1 2 3; 4 5 6], B (3, 2) = [1 0; 0 1; 1 1]: A B = [4 5; 10 11].
        let a: Vec<bf16> = [1., 2., 3., 4., 5., 6.].map(bf16::from_f32).to_vec();
        let b: Vec<bf16> = [1., 0., 0., 1., 1., 1.].map(bf16::from_f32).to_vec();
        let g = Gemm::new(2, 2, 3);
        let c: Vec<f32> = vec![f32::NAN; 4];
        assert_eq!(reference(&g, &a, &b, None, &c, &[0, 1]), [4., 5., 10., 11.]);
        // Same product with both operands stored transposed: A^T (3, 2), B^T (2, 3).
        let at: Vec<bf16> = [1., 4., 2., 5., 3., 6.].map(bf16::from_f32).to_vec();
        let bt: Vec<bf16> = [1., 0., 1., 0., 1., 1.].map(bf16::from_f32).to_vec();
        let gt = g.with_ops(Op::T, Op::T);
        assert_eq!(reference(&gt, &at, &bt, None, &c, &[1]), [10., 11.]);
        // alpha, beta, bias, and a padded ldc.
        let old = [1.0f32, 2.0, 99.0, 3.0, 4.0];
        let bias: Vec<bf16> = [0.5, -0.5].map(bf16::from_f32).to_vec();
        let g2 = g.with_alpha(2.0).with_beta(1.0).with_ld(3, 2, 3);
        assert_eq!(
            reference(&g2, &a, &b, Some(&bias), &old, &[0, 1]),
            [9.5, 11.5, 23.5, 25.5]
        );
    }

    #[test]
    fn gelu_matches_known_values() {
        assert_eq!(gelu(0.0), 0.0);
        assert!((gelu(1.0) - 0.841_191_990).abs() < 1e-8);
        assert!((gelu(-1.0) + 0.158_808_009).abs() < 1e-8);
        assert!((gelu(10.0) - 10.0).abs() < 1e-12);
    }
}
