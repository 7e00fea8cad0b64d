//! Writes every registered PTX module to a folder (`<module>.ptx`) and prints the kernels in
//! each, for reading the exact text the runtime hands to the driver or the simulated device.
//!
//!     cargo run -p lathe-kernels --example dump_ptx -- OUT_DIR

use lathe_kernels::registry;
use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let Some(out) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: dump_ptx OUT_DIR");
        std::process::exit(2);
    };
    std::fs::create_dir_all(&out)?;
    for m in registry::modules() {
        let path = out.join(format!("{}.ptx", m.name));
        std::fs::write(&path, (m.ptx)().as_bytes())?;
        let entries: Vec<_> = registry::kernels()
            .into_iter()
            .filter(|k| std::ptr::eq(k.module, m))
            .map(|k| k.entry)
            .collect();
        println!(
            "{} ({}): {}",
            path.display(),
            m.target.name(),
            entries.join(" ")
        );
    }
    Ok(())
}
