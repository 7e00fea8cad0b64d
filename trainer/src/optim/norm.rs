//! Global gradient norm and the clipping factor.
//!
//! The sum of squares accumulates in f64 over fixed chunks of [`NORM_CHUNK`] elements aligned
//! to global indices: each chunk is summed in order on one thread, then the chunk partials are
//! added in chunk order. The result is therefore bitwise the same for any thread count, and a
//! sharded run whose shard boundaries are multiples of `NORM_CHUNK` gets the same partials.

use rayon::prelude::*;

/// Elements per partial sum of the gradient norm.
pub const NORM_CHUNK: usize = 1 << 14;

fn chunk_sq_sum(xs: &[f32], inv_scale: f32) -> f64 {
    let mut s = 0.0f64;
    for &x in xs {
        // The unscaled gradient exactly as the unscale pass stores it (f32 product).
        let u = (x * inv_scale) as f64;
        s += u * u;
    }
    s
}

/// Partial sums of squares of the unscaled gradients (`grads[i] * inv_scale` rounded to f32,
/// then squared and summed in f64), one per
/// global chunk of [`NORM_CHUNK`] elements that `grads` touches. `offset` is the global index of
/// `grads[0]`; a shard that starts or ends inside a chunk contributes a partial for the piece it
/// holds. Adding all ranks' partials in global chunk order gives [`grad_sq_sum`] of the whole.
pub fn grad_sq_partials(grads: &[f32], inv_scale: f32, offset: usize) -> Vec<f64> {
    let inv = inv_scale;
    let head = ((NORM_CHUNK - offset % NORM_CHUNK) % NORM_CHUNK).min(grads.len());
    let (first, rest) = grads.split_at(head);
    let mut out = Vec::with_capacity(rest.len().div_ceil(NORM_CHUNK) + 1);
    if !first.is_empty() {
        out.push(chunk_sq_sum(first, inv));
    }
    if rest.len() <= NORM_CHUNK {
        if !rest.is_empty() {
            out.push(chunk_sq_sum(rest, inv));
        }
    } else {
        let partials: Vec<f64> = rest
            .par_chunks(NORM_CHUNK)
            .map(|c| chunk_sq_sum(c, inv))
            .collect();
        out.extend(partials);
    }
    out
}

/// Sum of squares of the unscaled gradients: the partials of [`grad_sq_partials`] (offset 0)
/// added in order.
pub fn grad_sq_sum(grads: &[f32], inv_scale: f32) -> f64 {
    grad_sq_partials(grads, inv_scale, 0).iter().sum()
}

/// Global L2 norm of the unscaled gradients `f32(grads[i] * inv_scale)`, accumulated in f64
/// (so `grad_norm(g, s)` equals `grad_norm` of the unscaled buffer with scale 1, bit for bit).
/// Non-finite when any gradient is.
pub fn grad_norm(grads: &[f32], inv_scale: f32) -> f64 {
    grad_sq_sum(grads, inv_scale).sqrt()
}

/// The factor that clips the global norm to `max_norm`, as PyTorch's `clip_grad_norm_`:
/// `min(1, max_norm / (norm + 1e-6))`. Returns 1 (no clipping) when `max_norm` is not a positive
/// finite number (clipping disabled) or when `norm` is not finite (that step is skipped anyway).
pub fn clip_factor(norm: f64, max_norm: f64) -> f32 {
    if !(max_norm.is_finite() && max_norm > 0.0 && norm.is_finite()) {
        return 1.0;
    }
    (max_norm / (norm + 1e-6)).min(1.0) as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use lathe_kernels::rng::Rng;

    #[test]
    fn norm_matches_f64_reference_and_is_bitwise_stable() {
        let n = 5 * NORM_CHUNK + 123;
        let g = Rng::new(1).vec_f32(n, -2.0, 2.0);
        let reference: f64 = g
            .iter()
            .map(|&x| (x as f64 * 0.5).powi(2))
            .sum::<f64>()
            .sqrt();
        let got = grad_norm(&g, 0.5);
        assert!(
            (got - reference).abs() <= 1e-12 * reference,
            "{got} {reference}"
        );
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let single = pool.install(|| grad_norm(&g, 0.5));
        assert_eq!(single.to_bits(), got.to_bits());
    }

    #[test]
    fn aligned_shards_reproduce_the_whole() {
        let n = 4 * NORM_CHUNK + 7;
        let g = Rng::new(2).vec_f32(n, -1.0, 1.0);
        let whole = grad_sq_sum(&g, 1.0);
        let cut = 2 * NORM_CHUNK;
        let mut parts = grad_sq_partials(&g[..cut], 1.0, 0);
        parts.extend(grad_sq_partials(&g[cut..], 1.0, cut));
        assert_eq!(parts.iter().sum::<f64>().to_bits(), whole.to_bits());
        // An unaligned shard start still covers every element once.
        let mut parts = grad_sq_partials(&g[..100], 1.0, 0);
        parts.extend(grad_sq_partials(&g[100..], 1.0, 100));
        assert_eq!(parts.len(), 6);
        assert!((parts.iter().sum::<f64>() - whole).abs() < 1e-9 * whole);
    }

    #[test]
    fn nonfinite_gradients_give_nonfinite_norm() {
        assert!(!grad_norm(&[1.0, f32::NAN], 1.0).is_finite());
        assert!(!grad_norm(&[1.0, f32::INFINITY], 1.0).is_finite());
        assert_eq!(grad_norm(&[3.0, 4.0], 1.0), 5.0);
        assert_eq!(grad_norm(&[], 1.0), 0.0);
    }

    #[test]
    fn clip_factor_follows_pytorch() {
        assert_eq!(clip_factor(0.5, 1.0), 1.0);
        assert_eq!(clip_factor(2.0, 1.0), (1.0 / (2.0 + 1e-6)) as f32);
        assert_eq!(clip_factor(2.0, 0.0), 1.0);
        assert_eq!(clip_factor(f64::NAN, 1.0), 1.0);
        assert_eq!(clip_factor(f64::INFINITY, 1.0), 1.0);
    }
}
