//! The low-precision working copy and the chunked parallel driver shared by the optimizers.

use half::{bf16, f16};
use rayon::prelude::*;

use super::rounding::{
    Rounding, bf16_nearest, bf16_stochastic, f16_nearest, stochastic_bits, stochastic_key,
};

/// Elements per parallel task of the elementwise optimizer updates. The updates are elementwise,
/// so the result does not depend on this value or on the thread count.
pub(crate) const CHUNK: usize = 1 << 15;

/// The working copy an optimizer step writes after updating the fp32 master weights. Same
/// length and offsets as the master buffer (or the same shard of it).
#[derive(Debug)]
pub enum WorkingCopy<'a> {
    /// No working copy (`fp32`: the forward pass reads the master weights).
    None,
    /// bf16 working copy, rounded to nearest even or stochastically.
    Bf16 {
        buf: &'a mut [bf16],
        rounding: Rounding,
    },
    /// IEEE half working copy, rounded to nearest even.
    F16(&'a mut [f16]),
}

impl WorkingCopy<'_> {
    /// Length of the buffer, `None` for [`WorkingCopy::None`].
    pub fn buffer_len(&self) -> Option<usize> {
        match self {
            WorkingCopy::None => None,
            WorkingCopy::Bf16 { buf, .. } => Some(buf.len()),
            WorkingCopy::F16(buf) => Some(buf.len()),
        }
    }
}

/// One chunk of the working copy, with what is needed to round into it.
pub(crate) enum WorkChunk<'a> {
    None,
    Bf16Nearest(&'a mut [bf16]),
    Bf16Stochastic(&'a mut [bf16], u64),
    F16(&'a mut [f16]),
}

impl WorkChunk<'_> {
    /// Rounds `master` into this chunk. `base` is the global index of `master[0]`.
    pub(crate) fn write(&mut self, master: &[f32], base: usize) {
        match self {
            WorkChunk::None => {}
            WorkChunk::Bf16Nearest(w) => {
                for (w, &p) in w.iter_mut().zip(master) {
                    *w = bf16_nearest(p);
                }
            }
            WorkChunk::Bf16Stochastic(w, key) => {
                for (i, (w, &p)) in w.iter_mut().zip(master).enumerate() {
                    *w = bf16_stochastic(p, stochastic_bits(*key, (base + i) as u64));
                }
            }
            WorkChunk::F16(w) => {
                for (w, &p) in w.iter_mut().zip(master) {
                    *w = f16_nearest(p);
                }
            }
        }
    }
}

fn split_chunks<T>(buf: &mut [T], n_chunks: usize) -> Vec<&mut [T]> {
    if buf.is_empty() {
        return (0..n_chunks).map(|_| <&mut [T]>::default()).collect();
    }
    buf.chunks_mut(CHUNK).collect()
}

/// Splits a working copy into per-chunk pieces. `sr_step` keys stochastic rounding.
fn split_working<'a>(w: WorkingCopy<'a>, n_chunks: usize, sr_step: u64) -> Vec<WorkChunk<'a>> {
    match w {
        WorkingCopy::None => (0..n_chunks).map(|_| WorkChunk::None).collect(),
        WorkingCopy::Bf16 {
            buf,
            rounding: Rounding::Nearest,
        } => split_chunks(buf, n_chunks)
            .into_iter()
            .map(WorkChunk::Bf16Nearest)
            .collect(),
        WorkingCopy::Bf16 {
            buf,
            rounding: Rounding::Stochastic { seed },
        } => {
            let key = stochastic_key(seed, sr_step);
            split_chunks(buf, n_chunks)
                .into_iter()
                .map(|c| WorkChunk::Bf16Stochastic(c, key))
                .collect()
        }
        WorkingCopy::F16(buf) => split_chunks(buf, n_chunks)
            .into_iter()
            .map(WorkChunk::F16)
            .collect(),
    }
}

/// One chunk of every buffer an optimizer step touches. `s0`/`s1` are optimizer-state chunks,
/// empty when the optimizer keeps fewer buffers.
pub(crate) struct Chunk<'a> {
    /// Global index (in the full flat buffer) of element 0 of this chunk.
    pub base: usize,
    pub master: &'a mut [f32],
    pub grads: &'a [f32],
    pub s0: &'a mut [f32],
    pub s1: &'a mut [f32],
    work: WorkChunk<'a>,
}

/// Runs `update` over fixed chunks in parallel, then rounds each updated master chunk into the
/// working copy. All non-empty buffers must have the length of `master` (checked by callers);
/// `offset` is the global index of `master[0]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn for_each_chunk(
    master: &mut [f32],
    grads: &[f32],
    s0: &mut [f32],
    s1: &mut [f32],
    working: WorkingCopy<'_>,
    offset: usize,
    sr_step: u64,
    update: impl Fn(&mut Chunk<'_>) + Sync,
) {
    let n_chunks = master.len().div_ceil(CHUNK);
    let works = split_working(working, n_chunks, sr_step);
    let chunks: Vec<Chunk<'_>> = master
        .chunks_mut(CHUNK)
        .zip(grads.chunks(CHUNK))
        .zip(split_chunks(s0, n_chunks))
        .zip(split_chunks(s1, n_chunks))
        .zip(works)
        .enumerate()
        .map(|(i, ((((master, grads), s0), s1), work))| Chunk {
            base: offset + i * CHUNK,
            master,
            grads,
            s0,
            s1,
            work,
        })
        .collect();
    let run = |mut c: Chunk<'_>| {
        update(&mut c);
        c.work.write(c.master, c.base);
    };
    if n_chunks <= 1 {
        chunks.into_iter().for_each(run);
    } else {
        chunks.into_par_iter().for_each(run);
    }
}

/// Rounds `master` into `working` without an optimizer step (after initialisation or after
/// loading a checkpoint). `offset` is the global index of `master[0]`; `sr_step` keys stochastic
/// rounding. Lengths must match (checked: returns `false` and writes nothing otherwise).
pub fn write_working_copy(
    master: &[f32],
    working: WorkingCopy<'_>,
    offset: usize,
    sr_step: u64,
) -> bool {
    if working.buffer_len().is_some_and(|l| l != master.len()) {
        return false;
    }
    let n_chunks = master.len().div_ceil(CHUNK);
    let works = split_working(working, n_chunks, sr_step);
    let chunks: Vec<_> = master.chunks(CHUNK).zip(works).enumerate().collect();
    chunks
        .into_par_iter()
        .for_each(|(i, (m, mut w))| w.write(m, offset + i * CHUNK));
    true
}
