//! PTX text: hand-written templates that Rust fills in for a dtype or a tile shape.
//!
//! The instruction stream of every kernel is written here by hand; Rust only substitutes names,
//! element widths and the per-element arithmetic.

pub mod elementwise;
pub mod reduce;

use crate::desc::Target;
use std::fmt::Write;

/// The module header every Lathe PTX file starts with. `.version 8.0` (CUDA 12.0) is the newest
/// ISA these modules need, so drivers from 525 on can load them.
pub fn header(target: Target) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "//");
    let _ = writeln!(s, "// Lathe: hand-written PTX");
    let _ = writeln!(s, "//");
    let _ = writeln!(s, ".version 8.0");
    let _ = writeln!(s, ".target {}", target.name());
    let _ = writeln!(s, ".address_size 64");
    s
}
