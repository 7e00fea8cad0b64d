//! Assembles every registry module with ptxas for its targets and prints the resource table.
//! Fails on any ptxas error and on warnings that say wgmma was serialised. Skips (with a
//! message) when ptxas is not installed, unless `LATHE_REQUIRE_PTXAS=1`.

use lathe_kernels::ptxas::{archs_for, assemble, find_ptxas, format_table};
use lathe_kernels::registry;

#[test]
fn every_module_assembles_with_ptxas() {
    let Some(ptxas) = find_ptxas() else {
        if std::env::var("LATHE_REQUIRE_PTXAS").as_deref() == Ok("1") {
            panic!("LATHE_REQUIRE_PTXAS=1 but no ptxas was found (set LATHE_PTXAS or PATH)");
        }
        eprintln!("skipped: ptxas not found (set LATHE_PTXAS or put ptxas on PATH)");
        return;
    };
    let mut reports = Vec::new();
    let mut failures = Vec::new();
    for m in registry::modules() {
        for arch in archs_for(m.target) {
            match assemble(&ptxas, m, arch) {
                Ok(r) => {
                    for w in r.fatal_warnings() {
                        failures.push(format!("{} {arch}: {w}", m.name));
                    }
                    let entries_in_registry = registry::kernels()
                        .iter()
                        .filter(|k| std::ptr::eq(k.module, m))
                        .count();
                    if r.entries.len() != entries_in_registry {
                        failures.push(format!(
                            "{} {arch}: ptxas compiled {} entries, the registry lists {}",
                            m.name,
                            r.entries.len(),
                            entries_in_registry
                        ));
                    }
                    reports.push(r);
                }
                Err(e) => failures.push(e.to_string()),
            }
        }
    }
    println!("{}", format_table(&reports));
    assert!(
        failures.is_empty(),
        "ptxas check failed:\n{}",
        failures.join("\n")
    );
}
