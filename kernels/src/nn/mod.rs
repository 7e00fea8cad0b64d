//! Memory-bound training kernels: the fused optimizer and mixed-precision bookkeeping, and
//! the non-matmul layers of a GPT (layernorm, GELU, residual and bias adds, the fused
//! softmax cross-entropy, embeddings, causal attention softmax). Every kernel is hand-written
//! PTX printed by a Rust template, with f32 arithmetic and f32 / bf16 / f16 storage, a
//! descriptor, and a CPU twin. Napkin math and design notes per kernel: `NOTES.md` here.
//!
//! Determinism: no kernel uses float atomics. Reductions across threads use fixed trees
//! (warp butterflies, then warps in order); reductions across blocks write per-block partials
//! that a second pass folds in a fixed order. The same inputs give the same bits on every run.
//!
//! Families (one file each, PTX in the `*_ptx` files):
//! - [`amp`]: step state, non-finite check (+ unscale), gradient norm, loss-scale update.
//! - [`adamw`]: fused AdamW with device-side skip and bf16/f16 working copy.
//! - [`layernorm`]: forward (mean, rstd saved) and backward, with [`colsum`] for the
//!   deterministic weight/bias gradient.
//! - [`pointwise`]: GELU (tanh form) forward/backward, residual add, bias add.
//! - [`classifier`]: fused softmax cross-entropy (loss and dlogits in one kernel).
//! - [`embedding`]: token + position embedding forward and deterministic backward.
//! - [`attention`]: causal masked softmax forward and backward (between batched GEMMs).
//! - [`heads`]: attention head split / merge permutes (qkv -> q, k, v and back).
//!
//! Kernels of the autograd tape's device backend:
//! - [`xent`]: cross-entropy forward (loss, saved logsumexp) and backward.
//! - [`tape_pointwise`]: product, ReLU, mixed-dtype accumulate, fill from a device scalar.
//! - [`gather`]: row gather (embedding lookup into one table).
//! - [`layout`]: strided 2-D block copy and the swap of two axes.
//! - [`softmax`]: plain row softmax forward and backward.
//!
//! Fused causal attention (FlashAttention-2 on `mma.sync`): [`flash`].

pub mod adamw;
mod adamw_ptx;
pub mod amp;
mod amp_ptx;
pub mod attention;
pub mod classifier;
pub mod colsum;
pub mod embedding;
mod embedding_ptx;
pub mod flash;
mod flash_ptx;
pub mod gather;
pub mod heads;
pub mod layernorm;
mod layernorm_ptx;
pub mod layout;
pub mod pointwise;
pub(crate) mod ptxgen;
#[cfg(test)]
mod sim_tests;
#[cfg(test)]
mod sim_tests_flash;
#[cfg(test)]
mod sim_tests_layers;
#[cfg(test)]
mod sim_tests_tape;
pub mod softmax;
pub mod tape_pointwise;
pub mod xent;

use crate::desc::{Elem, KernelDesc, Module};

/// Every module of this family.
pub fn modules() -> Vec<&'static Module> {
    vec![
        &amp::MODULE,
        &adamw::MODULE,
        &layernorm::MODULE,
        &colsum::MODULE,
        &pointwise::MODULE,
        &classifier::MODULE,
        &embedding::MODULE,
        &attention::MODULE,
        &heads::MODULE,
        &xent::MODULE,
        &tape_pointwise::MODULE,
        &gather::MODULE,
        &layout::MODULE,
        &softmax::MODULE,
        &flash::MODULE,
    ]
}

/// Every kernel of this family.
pub fn kernels() -> Vec<&'static KernelDesc> {
    let mut v: Vec<&'static KernelDesc> = Vec::new();
    for family in [
        amp::ALL,
        adamw::ALL,
        layernorm::ALL,
        colsum::ALL,
        pointwise::ALL,
        classifier::ALL,
        embedding::ALL,
        attention::ALL,
        heads::ALL,
        xent::ALL,
        tape_pointwise::ALL,
        gather::ALL,
        layout::ALL,
        softmax::ALL,
        flash::ALL,
    ] {
        v.extend_from_slice(family);
    }
    v
}

/// The activation dtypes the row kernels come in.
pub const ACT_DTYPES: [Elem; 3] = [Elem::F32, Elem::BF16, Elem::F16];

/// Picks the kernel of a dtype from a `[f32, bf16, f16]` triple.
pub(crate) fn by_dtype(e: Elem, table: [&'static KernelDesc; 3]) -> Option<&'static KernelDesc> {
    match e {
        Elem::F32 => Some(table[0]),
        Elem::BF16 => Some(table[1]),
        Elem::F16 => Some(table[2]),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each descriptor's parameter list matches its PTX entry, name for name.
    #[test]
    fn descriptors_match_their_ptx_entries() {
        for m in modules() {
            let ptx = (m.ptx)();
            let entries: Vec<&KernelDesc> = kernels()
                .into_iter()
                .filter(|k| std::ptr::eq(k.module, m))
                .collect();
            assert_eq!(
                ptx.matches(".visible .entry ").count(),
                entries.len(),
                "module {}: entry count",
                m.name
            );
            for d in entries {
                let head = format!(".visible .entry {}(", d.entry);
                let start = ptx
                    .find(&head)
                    .unwrap_or_else(|| panic!("{} missing from {}", d.entry, m.name));
                let end = start + ptx[start..].find(')').expect("parameter list");
                let params: Vec<&str> = ptx[start + head.len()..end]
                    .split(',')
                    .map(|p| p.split_whitespace().last().unwrap_or(""))
                    .collect();
                let want: Vec<String> = d.args.iter().map(|a| format!("p_{}", a.name)).collect();
                assert_eq!(params, want, "{}: descriptor and PTX disagree", d.entry);
                for (a, p) in d.args.iter().zip(ptx[start + head.len()..end].split(',')) {
                    let ty = p.split_whitespace().nth(1).unwrap_or("");
                    let want_ty = match a.kind {
                        crate::desc::ArgKind::In(_)
                        | crate::desc::ArgKind::Out(_)
                        | crate::desc::ArgKind::U64 => ".u64",
                        crate::desc::ArgKind::U32 => ".u32",
                        crate::desc::ArgKind::F32 => ".f32",
                        crate::desc::ArgKind::TensorMap(_) => ".b8",
                    };
                    assert_eq!(ty, want_ty, "{} parameter {}", d.entry, a.name);
                }
            }
        }
    }

    #[test]
    fn entries_follow_the_naming_rule() {
        for k in kernels() {
            assert!(k.entry.starts_with("lathe_"), "{}", k.entry);
            let g = (k.geometry)(&crate::desc::Problem {
                n: 1000,
                m: 7,
                k: 50,
                batch: 3,
            });
            assert!(
                g.grid.0 >= 1 && g.grid.1 >= 1 && g.grid.2 >= 1,
                "{}",
                k.entry
            );
            assert!(g.block.0 * g.block.1 * g.block.2 <= 1024, "{}", k.entry);
        }
    }
}
