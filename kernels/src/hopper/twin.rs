//! CPU twin of the Hopper GEMM: f64 accumulation over the exact bf16 operand values.

use half::bf16;

/// Shape or length errors of the twin's inputs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TwinError {
    #[error("hopper twin: {what} holds {got} elements, ({rows}, {cols}) needs {need}")]
    Length {
        what: &'static str,
        rows: usize,
        cols: usize,
        need: usize,
        got: usize,
    },
}

fn check(what: &'static str, v: &[bf16], rows: usize, cols: usize) -> Result<(), TwinError> {
    let need = rows * cols;
    if v.len() != need {
        return Err(TwinError::Length {
            what,
            rows,
            cols,
            need,
            got: v.len(),
        });
    }
    Ok(())
}

/// `C(m, n) = A(m, k) B(n, k)^T` in f64: `a` row-major `(m, k)`, `b` row-major `(n, k)`;
/// returns C row-major `(m, n)`, summed in a fixed order (deterministic).
pub fn gemm_tn(
    a: &[bf16],
    b: &[bf16],
    m: usize,
    n: usize,
    k: usize,
) -> Result<Vec<f64>, TwinError> {
    check("A", a, m, k)?;
    check("B", b, n, k)?;
    let a64: Vec<f64> = a.iter().map(|x| x.to_f64()).collect();
    let b64: Vec<f64> = b.iter().map(|x| x.to_f64()).collect();
    let mut c = vec![0f64; m * n];
    for i in 0..m {
        let ar = &a64[i * k..(i + 1) * k];
        for j in 0..n {
            let br = &b64[j * k..(j + 1) * k];
            c[i * n + j] = ar.iter().zip(br).map(|(x, y)| x * y).sum();
        }
    }
    Ok(c)
}

/// [`gemm_tn`] restricted to the rows in `rows` (for spot checks of large problems): returns
/// `rows.len() x n` values, row-major.
pub fn gemm_tn_rows(
    a: &[bf16],
    b: &[bf16],
    m: usize,
    n: usize,
    k: usize,
    rows: &[usize],
) -> Result<Vec<f64>, TwinError> {
    check("A", a, m, k)?;
    check("B", b, n, k)?;
    let mut c = Vec::with_capacity(rows.len() * n);
    for &i in rows {
        let ar = &a[i * k..(i + 1) * k];
        for j in 0..n {
            let br = &b[j * k..(j + 1) * k];
            c.push(
                ar.iter()
                    .zip(br)
                    .map(|(x, y)| x.to_f64() * y.to_f64())
                    .sum(),
            );
        }
    }
    Ok(c)
}
