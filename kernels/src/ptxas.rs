//! Assembling registry modules with `ptxas` (the CUDA toolkit's PTX assembler) to catch errors
//! without a GPU, and reading its resource report: registers, stack, spills, shared memory.
//!
//! Where ptxas comes from: the `LATHE_PTXAS` environment variable (a path), else `ptxas` on
//! `PATH`. CI installs CUDA 13.0's ptxas from the PyPI package `nvidia-cuda-nvcc==13.0.88`.

use crate::desc::{Module, Target};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Resources ptxas reports for one entry on one architecture.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EntryReport {
    pub entry: String,
    pub arch: String,
    pub registers: u32,
    pub stack_frame: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    pub shared_bytes: u32,
}

/// The outcome of assembling one module for one architecture.
#[derive(Clone, Debug, Default)]
pub struct ModuleReport {
    pub module: String,
    pub arch: String,
    pub entries: Vec<EntryReport>,
    /// Every `ptxas warning` line.
    pub warnings: Vec<String>,
}

impl ModuleReport {
    /// Warnings that make the check fail: wgmma serialised by ptxas means the kernel would run
    /// far below the speed it was written for.
    pub fn fatal_warnings(&self) -> Vec<&str> {
        self.warnings
            .iter()
            .filter(|w| w.contains("serialized") || w.contains("serialised"))
            .map(String::as_str)
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PtxasError {
    #[error("could not run ptxas at {path}: {source}")]
    Spawn {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not write the PTX of module `{module}` to a temporary file: {source}")]
    Io {
        module: String,
        source: std::io::Error,
    },
    #[error("ptxas rejected module `{module}` for {arch}:\n{log}")]
    Rejected {
        module: String,
        arch: String,
        log: String,
    },
}

/// Finds ptxas: `LATHE_PTXAS`, else `ptxas` on `PATH`.
pub fn find_ptxas() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("LATHE_PTXAS") {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("ptxas"))
        .find(|p| p.is_file())
}

/// The architectures a module is assembled for: its own target, and for sm_80 modules also
/// sm_90 (the H100 JIT-compiles them for that).
pub fn archs_for(target: Target) -> &'static [&'static str] {
    match target {
        Target::Sm80 => &["sm_80", "sm_90"],
        Target::Sm90a => &["sm_90a"],
    }
}

/// Assembles `module` for `arch` and parses the resource report.
pub fn assemble(ptxas: &Path, module: &Module, arch: &str) -> Result<ModuleReport, PtxasError> {
    let dir = std::env::temp_dir().join(format!("lathe-ptxas-{}", std::process::id()));
    let io = |source| PtxasError::Io {
        module: module.name.to_string(),
        source,
    };
    std::fs::create_dir_all(&dir).map_err(io)?;
    let src = dir.join(format!("{}-{arch}.ptx", module.name));
    let obj = dir.join(format!("{}-{arch}.cubin", module.name));
    std::fs::write(&src, (module.ptx)().as_bytes()).map_err(io)?;
    let out = Command::new(ptxas)
        .arg(format!("-arch={arch}"))
        .arg("-v")
        .arg("-o")
        .arg(&obj)
        .arg(&src)
        .output()
        .map_err(|source| PtxasError::Spawn {
            path: ptxas.to_path_buf(),
            source,
        })?;
    let _ = std::fs::remove_file(&src);
    let _ = std::fs::remove_file(&obj);
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(PtxasError::Rejected {
            module: module.name.to_string(),
            arch: arch.to_string(),
            log,
        });
    }
    Ok(parse_report(module.name, arch, &log))
}

fn number_before(line: &str, unit: &str) -> Option<u32> {
    let idx = line.find(unit)?;
    line[..idx].split_whitespace().last()?.parse().ok()
}

/// Parses `ptxas -v` output.
pub fn parse_report(module: &str, arch: &str, log: &str) -> ModuleReport {
    let mut report = ModuleReport {
        module: module.to_string(),
        arch: arch.to_string(),
        ..Default::default()
    };
    let mut current: Option<EntryReport> = None;
    for line in log.lines() {
        if line.contains("warning") {
            report.warnings.push(line.trim().to_string());
        }
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            if let Some(e) = current.take() {
                report.entries.push(e);
            }
            let name = rest.split('\'').next().unwrap_or_default();
            current = Some(EntryReport {
                entry: name.to_string(),
                arch: arch.to_string(),
                ..Default::default()
            });
        } else if let Some(e) = current.as_mut() {
            if line.contains("bytes stack frame") {
                e.stack_frame = number_before(line, "bytes stack frame").unwrap_or(0);
                e.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
                e.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used") && line.contains("registers") {
                e.registers = number_before(line, "registers").unwrap_or(0);
                e.shared_bytes = number_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    if let Some(e) = current.take() {
        report.entries.push(e);
    }
    report
}

/// One table row per entry: what CI prints.
pub fn format_table(reports: &[ModuleReport]) -> String {
    let mut s = format!(
        "{:<28} {:<7} {:>5} {:>7} {:>7} {:>7} {:>7}\n",
        "kernel", "arch", "regs", "stack", "spill-s", "spill-l", "smem"
    );
    for r in reports {
        for e in &r.entries {
            s.push_str(&format!(
                "{:<28} {:<7} {:>5} {:>7} {:>7} {:>7} {:>7}\n",
                e.entry,
                e.arch,
                e.registers,
                e.stack_frame,
                e.spill_stores,
                e.spill_loads,
                e.shared_bytes
            ));
        }
        for w in &r.warnings {
            s.push_str(&format!("  {} {}: {w}\n", r.module, r.arch));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_resource_report() {
        let log = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'lathe_sum_f32' for 'sm_90'\n\
ptxas info    : Function properties for lathe_sum_f32\n\
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
ptxas info    : Used 18 registers, used 1 barriers, 128 bytes smem, 372 bytes cmem[0]\n\
ptxas warning : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to the presence of Extern calls\n";
        let r = parse_report("reduce", "sm_90", log);
        assert_eq!(r.entries.len(), 1);
        let e = &r.entries[0];
        assert_eq!(e.entry, "lathe_sum_f32");
        assert_eq!((e.registers, e.stack_frame), (18, 8));
        assert_eq!(
            (e.spill_stores, e.spill_loads, e.shared_bytes),
            (4, 12, 128)
        );
        assert_eq!(r.fatal_warnings().len(), 1);
    }
}
