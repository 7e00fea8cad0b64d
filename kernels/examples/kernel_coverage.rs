//! Checks that every registered kernel appears in a launch log (one entry name per line, as
//! the simulated device writes with `LATHE_SIM_LAUNCH_LOG=FILE`). Prints how often each kernel
//! ran and exits 1 naming the kernels that never did.
//!
//!     cargo run -p lathe-kernels --example kernel_coverage -- FILE

use lathe_kernels::registry;
use std::collections::BTreeMap;

fn main() {
    let Some(path) = std::env::args_os().nth(1) else {
        eprintln!("usage: kernel_coverage LAUNCH_LOG");
        std::process::exit(2);
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("cannot read the launch log {}: {e}", path.to_string_lossy());
            std::process::exit(2);
        }
    };
    let mut runs: BTreeMap<&str, u64> = registry::kernels().iter().map(|k| (k.entry, 0)).collect();
    let mut unknown = BTreeMap::<&str, u64>::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        match runs.get_mut(line) {
            Some(n) => *n += 1,
            None => *unknown.entry(line).or_default() += 1,
        }
    }
    let missing: Vec<&str> = runs
        .iter()
        .filter(|(_, n)| **n == 0)
        .map(|(k, _)| *k)
        .collect();
    println!(
        "{} of {} registered kernels ran on the simulated device ({} launches)",
        runs.len() - missing.len(),
        runs.len(),
        runs.values().sum::<u64>()
    );
    for (k, n) in &unknown {
        println!("  (not in the registry: {k}, {n} launches)");
    }
    if !missing.is_empty() {
        eprintln!("never launched on the simulated device:");
        for k in &missing {
            eprintln!("  {k}");
        }
        std::process::exit(1);
    }
}
