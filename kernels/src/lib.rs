//! lathe-kernels: hand-written PTX kernels, their descriptors and CPU twins. No CUDA dependency.
//!
//! - [`desc`]: the descriptor types (entry, module, target, parameters, geometry, cost).
//! - [`ptx`]: the PTX templates.
//! - [`elementwise`], [`reduce`], [`nn`] (training ops), [`gemm`] (tensor-core matrix products):
//!   kernel families, each with its CPU twins.
//! - [`simt_gemm`]: batched f32-FMA GEMM (f32 training, attention products).
//! - [`registry`]: every module and kernel, for the runtime, the ptxas check and the profiler.
//! - [`tolerance`]: the dtype tolerance formula used by every kernel test.
//! - [`ptxas`]: assemble modules without a GPU and read the resource report.

pub mod desc;
pub mod elementwise;
pub mod gemm;
pub mod hopper;
pub mod nn;
pub mod ptx;
pub mod ptxas;
pub mod reduce;
pub mod rng;
pub mod simt_gemm;
#[cfg(test)]
mod simtest;
pub mod tolerance;

pub use desc::{Arg, ArgKind, Cost, Elem, Geometry, KernelDesc, Module, Problem, Target};

/// Every module and kernel Lathe ships.
pub mod registry {
    use super::*;

    /// Every PTX module.
    pub fn modules() -> Vec<&'static Module> {
        let mut v: Vec<&'static Module> = vec![&elementwise::MODULE, &reduce::MODULE];
        v.extend(nn::modules());
        v.extend(gemm::modules());
        v.extend(hopper::modules());
        v.extend(gemm::batched::modules());
        v.extend(simt_gemm::modules());
        v
    }

    /// Every kernel descriptor.
    pub fn kernels() -> Vec<&'static KernelDesc> {
        let mut v: Vec<&'static KernelDesc> = Vec::new();
        v.extend_from_slice(elementwise::ALL);
        v.extend_from_slice(reduce::ALL);
        v.extend(nn::kernels());
        v.extend(gemm::kernels());
        v.extend(hopper::kernels());
        v.extend(gemm::batched::kernels());
        v.extend(simt_gemm::kernels());
        v
    }

    /// A kernel by entry name.
    pub fn by_entry(entry: &str) -> Option<&'static KernelDesc> {
        kernels().into_iter().find(|k| k.entry == entry)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn entries_are_unique_and_modules_registered() {
            let ks = kernels();
            let mut names: Vec<_> = ks.iter().map(|k| k.entry).collect();
            names.sort();
            names.dedup();
            assert_eq!(names.len(), ks.len(), "duplicate entry names");
            let mods = modules();
            for k in &ks {
                assert!(
                    mods.iter().any(|m| std::ptr::eq(*m, k.module)),
                    "{}: module {} not registered",
                    k.entry,
                    k.module.name
                );
                assert!(k.entry.starts_with("lathe_"), "{}", k.entry);
            }
        }

        #[test]
        fn ptx_headers_are_pinned() {
            for m in modules() {
                let ptx = (m.ptx)();
                let version = ptx
                    .lines()
                    .find_map(|l| l.trim().strip_prefix(".version "))
                    .unwrap_or_else(|| panic!("{}: no .version", m.name));
                let (major, minor) = version.split_once('.').expect("x.y");
                let v: (u32, u32) = (major.parse().unwrap(), minor.parse().unwrap());
                assert!(
                    v <= (8, 0) || m.target == Target::Sm90a,
                    "{}: .version {version}",
                    m.name
                );
                assert!(
                    ptx.contains(&format!(".target {}", m.target.name())),
                    "{}",
                    m.name
                );
            }
        }
    }
}
