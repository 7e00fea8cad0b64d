//! Launch validation, parameter packing and the parallel run over blocks.

use super::block::Block;
use crate::error::{ErrorKind, SimError};
use crate::ir::*;
use crate::memory::Snapshot;
use crate::{Counters, Launch, Param, Region, SimConfig};
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

/// What every block of one launch shares (read-only).
pub(crate) struct LaunchCtx<'a> {
    pub(crate) k: &'a Kernel,
    pub(crate) params: Vec<u8>,
    pub(crate) mem: Snapshot,
    pub(crate) regions: &'a [Region],
    pub(crate) grid: (u32, u32, u32),
    pub(crate) block: (u32, u32, u32),
    pub(crate) nthreads: u32,
    pub(crate) dyn_shared: u32,
    pub(crate) shared_size: u32,
    pub(crate) budget: u64,
    pub(crate) abort: AtomicBool,
}

fn bad_launch(msg: String) -> SimError {
    SimError::new(ErrorKind::BadLaunch, msg)
}

/// Packs the parameter values into the kernel's parameter buffer.
fn pack_params(k: &Kernel, params: &[Param]) -> Result<Vec<u8>, SimError> {
    if params.len() != k.params.len() {
        return Err(bad_launch(format!(
            "`{}` takes {} parameters, {} given",
            k.name,
            k.params.len(),
            params.len()
        )));
    }
    let mut buf = vec![0u8; k.param_bytes as usize];
    for (i, (d, p)) in k.params.iter().zip(params).enumerate() {
        let bytes: Vec<u8> = match (p, d.array, d.ty, d.size) {
            (Param::U32(v), false, Ty::U(32) | Ty::S(32) | Ty::B(32), 4) => v.to_le_bytes().into(),
            (Param::U64(v), false, Ty::U(64) | Ty::S(64) | Ty::B(64), 8) => v.to_le_bytes().into(),
            (Param::F32(v), false, Ty::F32 | Ty::B(32), 4) => v.to_le_bytes().into(),
            (Param::Bytes(b), true, _, n) if b.len() == n as usize => b.clone(),
            _ => {
                return Err(bad_launch(format!(
                    "parameter {i} (`{}`, {:?}{}) of `{}` given as {p:?}",
                    d.name,
                    d.ty,
                    if d.array { " array" } else { "" },
                    k.name
                )));
            }
        };
        let o = d.offset as usize;
        buf[o..o + bytes.len()].copy_from_slice(&bytes);
    }
    Ok(buf)
}

/// Checks a launch and runs all its blocks.
pub(crate) fn run_launch(
    k: &Kernel,
    launch: &Launch,
    mem: Snapshot,
    config: &SimConfig,
) -> Result<Counters, SimError> {
    let (g, b) = (launch.grid, launch.block);
    if g.0 == 0 || g.1 == 0 || g.2 == 0 || g.0 >= 1 << 31 || g.1 > 65535 || g.2 > 65535 {
        return Err(bad_launch(format!("grid {g:?} out of range")));
    }
    let nthreads = b.0 as u64 * b.1 as u64 * b.2 as u64;
    if b.0 == 0 || b.1 == 0 || b.2 == 0 || b.0 > 1024 || b.1 > 1024 || b.2 > 64 || nthreads > 1024 {
        return Err(bad_launch(format!(
            "block {b:?} out of range (at most 1024 threads)"
        )));
    }
    if let Some(r) = k.reqntid.filter(|r| *r != b) {
        return Err(bad_launch(format!(
            "`{}` requires block {r:?}, got {b:?}",
            k.name
        )));
    }
    if let Some(m) = k
        .maxntid
        .filter(|m| nthreads > m.0 as u64 * m.1 as u64 * m.2 as u64)
    {
        return Err(bad_launch(format!(
            "`{}` allows at most {m:?} threads, got {b:?}",
            k.name
        )));
    }
    let shared_size = k.dyn_shared_base as u64 + launch.shared_bytes as u64;
    if shared_size > config.max_shared_per_block_optin as u64 {
        return Err(bad_launch(format!(
            "{} bytes of shared memory (static {} + dynamic {}) exceed the {} a block may use",
            shared_size, k.static_shared, launch.shared_bytes, config.max_shared_per_block_optin
        )));
    }
    let ctx = LaunchCtx {
        k,
        params: pack_params(k, &launch.params)?,
        mem,
        regions: &launch.regions,
        grid: g,
        block: b,
        nthreads: nthreads as u32,
        dyn_shared: launch.shared_bytes,
        shared_size: shared_size as u32,
        budget: config.instruction_budget,
        abort: AtomicBool::new(false),
    };
    let nblocks = g.0 as u64 * g.1 as u64 * g.2 as u64;
    let one = |i: u64| -> Result<Counters, SimError> {
        if ctx.abort.load(Ordering::Relaxed) {
            return Ok(Counters::default());
        }
        let r = Block::new(&ctx, i).run();
        if r.is_err() {
            ctx.abort.store(true, Ordering::Relaxed);
        }
        r
    };
    let total = if config.parallel_blocks && nblocks > 1 {
        (0..nblocks)
            .into_par_iter()
            .map(one)
            .try_reduce(Counters::default, |a, b| Ok(add(a, &b)))?
    } else {
        let mut t = Counters::default();
        for i in 0..nblocks {
            t = add(t, &one(i)?);
        }
        t
    };
    let mut total = total;
    total.blocks = nblocks;
    total.threads_per_block = nthreads as u32;
    total.static_shared_bytes = k.static_shared;
    total.dynamic_shared_bytes = launch.shared_bytes;
    Ok(total)
}

fn add(mut a: Counters, b: &Counters) -> Counters {
    let (x, y) = (&mut a.warp_instructions, &b.warp_instructions);
    x.int += y.int;
    x.fp += y.fp;
    x.sfu += y.sfu;
    x.convert += y.convert;
    x.global_mem += y.global_mem;
    x.shared_mem += y.shared_mem;
    x.param_mem += y.param_mem;
    x.control += y.control;
    x.sync += y.sync;
    x.tensor += y.tensor;
    x.async_copy += y.async_copy;
    a.lane_instructions += b.lane_instructions;
    a.global_load_requests += b.global_load_requests;
    a.global_store_requests += b.global_store_requests;
    a.global_load_sectors += b.global_load_sectors;
    a.global_store_sectors += b.global_store_sectors;
    a.global_load_bytes += b.global_load_bytes;
    a.global_store_bytes += b.global_store_bytes;
    a.global_atomics += b.global_atomics;
    a.shared_load_requests += b.shared_load_requests;
    a.shared_store_requests += b.shared_store_requests;
    a.shared_bank_conflicts += b.shared_bank_conflicts;
    a.tma_bytes += b.tma_bytes;
    a.cp_async_bytes += b.cp_async_bytes;
    a.tensor_flops += b.tensor_flops;
    a
}
