//! CPU twins of the non-finite gradient check and the fused "check + unscale" kernel.
//!
//! Both run over fixed chunks with rayon. The result is an OR over elements, so it does not
//! depend on the chunking or the thread count.

use rayon::prelude::*;

/// Elements per parallel task. Below this length the work runs on the calling thread.
const CHUNK: usize = 1 << 16;

fn chunk_has_nonfinite(xs: &[f32]) -> bool {
    // `fold` with `|` (not `any`) so the loop has no early exit and vectorizes.
    xs.iter().fold(false, |acc, x| acc | !x.is_finite())
}

/// Whether any gradient is inf or NaN. `grads`: any length, f32.
pub fn has_nonfinite(grads: &[f32]) -> bool {
    if grads.len() <= CHUNK {
        return chunk_has_nonfinite(grads);
    }
    grads.par_chunks(CHUNK).any(chunk_has_nonfinite)
}

fn chunk_unscale(xs: &mut [f32], inv_scale: f32) -> bool {
    let mut found = false;
    for x in xs.iter_mut() {
        found |= !x.is_finite();
        *x *= inv_scale;
    }
    found
}

/// The fused check-and-unscale pass (PyTorch's `_amp_foreach_non_finite_check_and_unscale_`):
/// every element is multiplied by `inv_scale` in place, and the result says whether any element
/// was inf or NaN *before* scaling. `grads`: any length, f32. The multiply happens even when a
/// non-finite value is found (the step is then skipped, so the values do not matter).
pub fn unscale_and_check(grads: &mut [f32], inv_scale: f32) -> bool {
    if grads.len() <= CHUNK {
        return chunk_unscale(grads, inv_scale);
    }
    grads
        .par_chunks_mut(CHUNK)
        .map(|c| chunk_unscale(c, inv_scale))
        .reduce(|| false, |a, b| a | b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_inf_and_nan_anywhere() {
        let n = 3 * CHUNK + 17;
        let mut g = vec![0.5f32; n];
        assert!(!has_nonfinite(&g));
        for (pos, bad) in [
            (0, f32::NAN),
            (n - 1, f32::INFINITY),
            (CHUNK + 3, f32::NEG_INFINITY),
        ] {
            let keep = g[pos];
            g[pos] = bad;
            assert!(has_nonfinite(&g), "pos {pos}");
            assert!(has_nonfinite(&g[pos..pos + 1]));
            g[pos] = keep;
        }
        assert!(!has_nonfinite(&[]));
    }

    #[test]
    fn unscale_multiplies_and_reports() {
        for n in [5, 2 * CHUNK + 1] {
            let mut g: Vec<f32> = (0..n).map(|i| i as f32 - 2.0).collect();
            assert!(!unscale_and_check(&mut g, 0.25));
            assert!(
                g.iter()
                    .enumerate()
                    .all(|(i, &x)| x == (i as f32 - 2.0) * 0.25)
            );
            g[n / 2] = f32::NAN;
            assert!(unscale_and_check(&mut g, 1.0));
        }
        // The check looks at the value before scaling: a huge value scaled down is still finite.
        let mut g = vec![f32::MAX];
        assert!(!unscale_and_check(&mut g, 0.5));
    }
}
