//! Test support: runs kernels on Lathe's simulated device (lathe-sim) with the parameters and
//! geometry of their descriptors.
//!
//! Every launch lists its regions: a pointer argument may be accessed from where it points to
//! the end of its buffer, and stored through only if the descriptor declares it `Out`. So a
//! kernel that reads before its pointer, past its buffer, or writes an input fails the launch.
//! The simulator's sanitizer also reports shared-memory races, missing barriers and misaligned
//! accesses as launch errors.

use crate::desc::{ArgKind, Geometry, KernelDesc, Problem};
use lathe_sim::{Counters, Launch, Param, Region, Sim, SimConfig};
use std::collections::HashMap;

/// One launch argument, in PTX parameter order.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Arg {
    /// A device address (0 for an unused pointer: it gets no region).
    Ptr(u64),
    U32(u32),
    U64(u64),
    F32(f32),
}

/// A simulated device with the buffers a test allocated.
pub(crate) struct Gpu {
    sim: Sim,
    modules: HashMap<&'static str, lathe_sim::Module>,
    /// (base, bytes) of every buffer.
    bufs: Vec<(u64, u64)>,
}

impl Gpu {
    pub fn new() -> Self {
        Gpu {
            sim: Sim::new(SimConfig::default()),
            modules: HashMap::new(),
            bufs: Vec::new(),
        }
    }

    /// `n` bytes (256-byte aligned), every byte 0xFF: NaN in every float type, so an output
    /// element a kernel fails to write shows up.
    pub fn alloc_bytes(&mut self, n: usize) -> u64 {
        let bytes = n.max(1) as u64;
        let a = self.sim.alloc(bytes).expect("simulated allocation");
        self.sim.fill(a, bytes, 0xFF).expect("poison fill");
        self.bufs.push((a, bytes));
        a
    }

    pub fn upload<T: bytemuck::Pod>(&mut self, v: &[T]) -> u64 {
        let a = self.alloc_bytes(std::mem::size_of_val(v));
        self.write(a, v);
        a
    }

    pub fn write<T: bytemuck::Pod>(&mut self, addr: u64, v: &[T]) {
        self.sim
            .write(addr, bytemuck::cast_slice(v))
            .expect("host write in bounds");
    }

    pub fn read<T: bytemuck::Pod>(&self, addr: u64, n: usize) -> Vec<T> {
        let mut out = vec![T::zeroed(); n];
        self.sim
            .read(addr, bytemuck::cast_slice_mut(&mut out))
            .expect("host read in bounds");
        out
    }

    /// Runs `desc` for `problem` on the geometry its descriptor gives.
    pub fn launch(
        &mut self,
        desc: &KernelDesc,
        problem: &Problem,
        args: &[Arg],
    ) -> Result<Counters, String> {
        self.launch_on(desc, (desc.geometry)(problem), args)
    }

    /// Runs `desc` on an explicit geometry (to reach shapes the descriptor picks only for
    /// large problems).
    pub fn launch_on(
        &mut self,
        desc: &KernelDesc,
        g: Geometry,
        args: &[Arg],
    ) -> Result<Counters, String> {
        if args.len() != desc.args.len() {
            return Err(format!(
                "{}: {} arguments for {} parameters",
                desc.entry,
                args.len(),
                desc.args.len()
            ));
        }
        let mut params = Vec::with_capacity(args.len());
        let mut regions = Vec::new();
        for (a, d) in args.iter().zip(desc.args) {
            let param = match (*a, d.kind) {
                (Arg::Ptr(p), ArgKind::In(_) | ArgKind::Out(_)) => {
                    if p != 0 {
                        regions.push(self.region(p, matches!(d.kind, ArgKind::Out(_)))?);
                    }
                    Param::U64(p)
                }
                (Arg::U32(v), ArgKind::U32) => Param::U32(v),
                (Arg::U64(v), ArgKind::U64) => Param::U64(v),
                (Arg::F32(x), ArgKind::F32) => Param::F32(x),
                _ => {
                    return Err(format!(
                        "{}: {a:?} for `{}` ({:?})",
                        desc.entry, d.name, d.kind
                    ));
                }
            };
            params.push(param);
        }
        let module = match self.modules.get(desc.module.name) {
            Some(m) => m.clone(),
            None => {
                let m = self
                    .sim
                    .load_module(&(desc.module.ptx)())
                    .map_err(|e| format!("loading {}: {e}", desc.module.name))?;
                self.modules.insert(desc.module.name, m.clone());
                m
            }
        };
        let launch = Launch {
            grid: g.grid,
            block: g.block,
            shared_bytes: g.shared_bytes,
            params,
            regions,
        };
        self.sim
            .launch(&module, desc.entry, &launch)
            .map_err(|e| format!("{}: {e}", desc.entry))
    }

    /// From `addr` to the end of the buffer holding it.
    fn region(&self, addr: u64, writable: bool) -> Result<Region, String> {
        let &(base, bytes) = self
            .bufs
            .iter()
            .find(|&&(b, n)| addr >= b && addr < b + n)
            .ok_or_else(|| format!("pointer {addr:#x} is in no buffer"))?;
        Ok(Region {
            addr,
            bytes: base + bytes - addr,
            writable,
        })
    }
}
