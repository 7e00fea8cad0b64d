fn main() {
    let sim = lathe_sim::Sim::new(Default::default());
    for e in std::fs::read_dir(std::env::args().nth(1).unwrap()).unwrap() {
        let p = e.unwrap().path();
        let s = std::fs::read_to_string(&p).unwrap();
        match sim.load_module(&s) {
            Ok(m) => println!("OK {:?} {}", p.file_name().unwrap(), m.entries().len()),
            Err(e) => println!("ERR {:?} {}", p.file_name().unwrap(), e),
        }
    }
}
