//! Tolerances for comparing a kernel with its CPU twin, written once as a formula of the dtype.
//!
//! The measure is the relative Frobenius error `||out - ref|| / ||ref||`:
//! under 1e-5 when operands and accumulation are f32, under 5e-3 when operands are bf16 or f16
//! (f32 accumulation). A NaN or infinity in the output where the reference is finite always
//! fails, and so does an unwritten (still NaN-poisoned) element.

use crate::desc::Elem;

/// The allowed relative Frobenius error for results whose operands are of type `operands`.
pub fn rel_tolerance(operands: Elem) -> f64 {
    match operands {
        Elem::F32 => 1e-5,
        Elem::BF16 | Elem::F16 => 5e-3,
        // Integer results must match exactly.
        Elem::U16 | Elem::U32 | Elem::I32 => 0.0,
    }
}

/// Relative Frobenius error of `out` against `reference` (0 when both are all zeros).
pub fn rel_frobenius_error(out: &[f64], reference: &[f64]) -> f64 {
    let mut num = 0f64;
    let mut den = 0f64;
    for (&o, &r) in out.iter().zip(reference) {
        num += (o - r) * (o - r);
        den += r * r;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// A comparison that failed, with enough detail to find the problem.
#[derive(Debug, Clone, PartialEq)]
pub struct Mismatch {
    pub what: String,
    pub detail: String,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.what, self.detail)
    }
}

/// Compares `out` with `reference` under `tol` (relative Frobenius). Non-finite values must
/// match in kind position by position (NaN where the reference is NaN, the same infinity).
pub fn check_close(what: &str, out: &[f64], reference: &[f64], tol: f64) -> Result<f64, Mismatch> {
    let fail = |detail: String| Mismatch {
        what: what.to_string(),
        detail,
    };
    if out.len() != reference.len() {
        return Err(fail(format!(
            "length {} != reference length {}",
            out.len(),
            reference.len()
        )));
    }
    let mut fo = Vec::with_capacity(out.len());
    let mut fr = Vec::with_capacity(out.len());
    for (i, (&o, &r)) in out.iter().zip(reference).enumerate() {
        if r.is_finite() {
            if !o.is_finite() {
                return Err(fail(format!(
                    "element {i} is {o} where the reference is {r} (unwritten or overflow)"
                )));
            }
            fo.push(o);
            fr.push(r);
        } else if r.is_nan() != o.is_nan() || (r.is_infinite() && o != r) {
            return Err(fail(format!("element {i} is {o}, reference {r}")));
        }
    }
    let err = rel_frobenius_error(&fo, &fr);
    if err.is_nan() || err > tol {
        let worst = fo
            .iter()
            .zip(&fr)
            .enumerate()
            .max_by(|a, b| {
                let da = (a.1.0 - a.1.1).abs();
                let db = (b.1.0 - b.1.1).abs();
                da.total_cmp(&db)
            })
            .map(|(i, (o, r))| format!("; worst element {i}: {o} vs {r}"))
            .unwrap_or_default();
        return Err(fail(format!(
            "relative Frobenius error {err:.3e} > {tol:.1e}{worst}"
        )));
    }
    Ok(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_within_and_fails_outside_tolerance() {
        let r = [1.0, -2.0, 3.0];
        assert!(check_close("ok", &[1.0, -2.0, 3.0 + 1e-6], &r, 1e-5).is_ok());
        assert!(check_close("bad", &[1.0, -2.0, 3.1], &r, 1e-5).is_err());
    }

    #[test]
    fn unwritten_elements_fail() {
        let e = check_close("poisoned", &[1.0, f64::NAN], &[1.0, 2.0], 1.0).unwrap_err();
        assert!(e.detail.contains("element 1"), "{e}");
        assert!(check_close("nan-ok", &[f64::NAN], &[f64::NAN], 0.0).is_ok());
        assert!(check_close("inf", &[f64::INFINITY], &[f64::NEG_INFINITY], 1.0).is_err());
    }

    #[test]
    fn tolerance_is_a_formula_of_dtype() {
        assert_eq!(rel_tolerance(Elem::F32), 1e-5);
        assert_eq!(rel_tolerance(Elem::BF16), 5e-3);
        assert_eq!(rel_tolerance(Elem::F16), 5e-3);
    }
}
