//! Per-rank memory of model state under each ZeRO stage: what a rank measures it holds, what
//! Lathe's layout predicts, and the ZeRO paper's formulas (Rajbhandari et al. 2020, section 3:
//! with mixed precision and Adam, 2 bytes of fp16 parameters + 2 of fp16 gradients + K = 12 of
//! optimizer state — fp32 master, momentum, variance — per parameter; stage 1 holds
//! `4 + 12/N`, stage 2 `2 + 14/N`, stage 3 `16/N` bytes per parameter on each of N ranks).
//!
//! Lathe differs from the paper in one place: gradients accumulate in f32 (4 bytes, not 2),
//! which is what makes K micro-batches of accumulation equal one K-times-larger batch to the
//! last bit. In fp32 runs the working copy is 4 bytes and separate from the master.

use super::ZeroStage;
use crate::precision::Precision;
use lathe_host::comm::shard_range;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// Bytes one rank holds, by role. Model-state fields are measured from the lengths of the
/// buffers the rank owns between steps (or predicted from the layout, [`RankMemory::predict`];
/// the two agree exactly).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankMemory {
    /// fp32 master weights (the rank's shard from stage 1 on).
    pub master: u64,
    /// The working copy the forward pass reads, in the compute dtype (sharded in stage 3).
    pub working: u64,
    /// f32 gradients kept between steps (sharded from stage 2 on).
    pub grads: u64,
    /// Optimizer moments (AdamW `m` and `v`, or SGD momentum) for the master the rank owns.
    pub optimizer: u64,
    /// `--offload-optimizer`: host staging buffers for the gradient and working-copy shards
    /// (pinned on a device run).
    pub staging: u64,
    /// Whether master, optimizer state and staging live in host memory (offload).
    pub offloaded: bool,
    /// CPU backend only: autograd's parameter store beyond the fields above, kept between
    /// steps (stages 0-1: its never-written master buffer, and in bf16/fp16 its f32 image of
    /// the working copy, which the tape reads).
    pub workspace_idle: u64,
    /// CPU backend only: the same while a step runs (stages 2-3: the whole full-size store,
    /// plus stage 3's gathered low-precision copy, all released after the step).
    pub workspace_step: u64,
}

impl RankMemory {
    /// Model state in ZeRO's sense: master + working copy + gradients + optimizer state.
    pub fn model_state(&self) -> u64 {
        self.master + self.working + self.grads + self.optimizer
    }

    /// Model state that stays next to the compute (all of it unless offloaded).
    pub fn device_resident(&self) -> u64 {
        if self.offloaded {
            self.working + self.grads
        } else {
            self.model_state()
        }
    }

    /// What the layout says rank `rank` of `world` holds at `stage` for `len` parameters of
    /// the given widths. `offload` adds the staging buffers (a gradient shard in f32 and, with a
    /// 2-byte working copy, a working-copy shard).
    pub fn predict(
        len: usize,
        world: usize,
        rank: usize,
        stage: ZeroStage,
        widths: &StateWidths,
        offload: bool,
    ) -> RankMemory {
        let shard = shard_range(len, world, rank).len() as u64;
        let n = len as u64;
        let own = if stage.shards_optimizer() { shard } else { n };
        let wlen = if stage.shards_parameters() { shard } else { n };
        let glen = if stage.shards_gradients() { shard } else { n };
        let half = widths.working == 2;
        let image = if half { 4 * n } else { 0 };
        let (idle, step) = if stage.shards_gradients() {
            let gathered = if stage.shards_parameters() && half {
                2 * n
            } else {
                0
            };
            (0, 12 * n + gathered)
        } else {
            (4 * n + image, 4 * n + image)
        };
        RankMemory {
            master: widths.master * own,
            working: widths.working * wlen,
            grads: widths.grads * glen,
            optimizer: widths.optimizer * own,
            staging: if offload {
                4 * own + if half { 2 * own } else { 0 }
            } else {
                0
            },
            offloaded: offload,
            workspace_idle: idle,
            workspace_step: step,
        }
    }
}

/// Bytes per parameter of each part of the model state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateWidths {
    /// Working copy (what the forward reads).
    pub working: u64,
    pub grads: u64,
    /// fp32 master.
    pub master: u64,
    /// Optimizer moments.
    pub optimizer: u64,
}

impl StateWidths {
    /// The ZeRO paper's mixed-precision Adam: fp16 parameters and gradients, K = 12.
    pub const ZERO_PAPER: StateWidths = StateWidths {
        working: 2,
        grads: 2,
        master: 4,
        optimizer: 8,
    };

    /// Lathe's: a 2-byte working copy in bf16/fp16 (4 bytes in fp32), f32 gradients, an f32
    /// master, and `optimizer_buffers` f32 moments (2 for AdamW, 1 for SGD with momentum).
    pub fn lathe(precision: Precision, optimizer_buffers: usize) -> StateWidths {
        StateWidths {
            working: if precision == Precision::Fp32 { 4 } else { 2 },
            grads: 4,
            master: 4,
            optimizer: 4 * optimizer_buffers as u64,
        }
    }

    /// Bytes per parameter one rank holds at `stage` among `world` ranks (shards taken as
    /// exactly `1/world` of the parameters).
    pub fn per_param(&self, stage: ZeroStage, world: usize) -> f64 {
        let n = world.max(1) as f64;
        let (w, g, m, o) = (
            self.working as f64,
            self.grads as f64,
            self.master as f64,
            self.optimizer as f64,
        );
        match stage {
            ZeroStage::DataParallel => w + g + m + o,
            ZeroStage::OptimizerState => w + g + (m + o) / n,
            ZeroStage::Gradients => w + (g + m + o) / n,
            ZeroStage::Parameters => (w + g + m + o) / n,
        }
    }

    /// The formula as text, e.g. `2 + 16/N`.
    pub fn formula(&self, stage: ZeroStage) -> String {
        let (w, g, s) = (self.working, self.grads, self.master + self.optimizer);
        match stage {
            ZeroStage::DataParallel => format!("{}", w + g + s),
            ZeroStage::OptimizerState => format!("{} + {}/N", w + g, s),
            ZeroStage::Gradients => format!("{w} + {}/N", g + s),
            ZeroStage::Parameters => format!("{}/N", w + g + s),
        }
    }
}

/// The ZeRO paper's model-state bytes per parameter on each of `world` ranks (mixed precision,
/// Adam): 16, `4 + 12/N`, `2 + 14/N`, `16/N` for stages 0-3.
pub fn paper_bytes_per_param(stage: ZeroStage, world: usize) -> f64 {
    StateWidths::ZERO_PAPER.per_param(stage, world)
}

/// One row of a [`MemoryTable`].
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryRow {
    pub stage: ZeroStage,
    pub world: usize,
    /// Rank 0's model state under Lathe's layout (rank 0 holds the largest shard).
    pub lathe_bytes: u64,
    pub lathe_per_param: f64,
    pub paper_per_param: f64,
}

/// Model-state memory per rank for one model at several world sizes, Lathe next to the paper.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryTable {
    pub model: String,
    pub params: usize,
    pub widths: StateWidths,
    pub rows: Vec<MemoryRow>,
}

/// The table for a model of `params` parameters trained in `precision` with an optimizer of
/// `optimizer_buffers` moments, at every stage and each world size in `worlds`. Allocates
/// nothing model-sized: it is arithmetic on the shard ranges.
pub fn memory_table(
    model: &str,
    params: usize,
    precision: Precision,
    optimizer_buffers: usize,
    worlds: &[usize],
) -> MemoryTable {
    let widths = StateWidths::lathe(precision, optimizer_buffers);
    let mut rows = Vec::new();
    for stage in ZeroStage::ALL {
        for &world in worlds {
            let m = RankMemory::predict(params, world.max(1), 0, stage, &widths, false);
            rows.push(MemoryRow {
                stage,
                world,
                lathe_bytes: m.model_state(),
                lathe_per_param: widths.per_param(stage, world),
                paper_per_param: paper_bytes_per_param(stage, world),
            });
        }
    }
    MemoryTable {
        model: model.to_string(),
        params,
        widths,
        rows,
    }
}

fn gib(bytes: f64) -> f64 {
    bytes / (1u64 << 30) as f64
}

impl std::fmt::Display for MemoryTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let w = &self.widths;
        writeln!(
            f,
            "model-state memory per rank: {} ({} parameters); Lathe: {}-byte working copy, \
             f32 gradients, f32 master, {} bytes of optimizer moments per parameter",
            self.model, self.params, w.working, w.optimizer
        )?;
        writeln!(
            f,
            "stage  N   Lathe formula  Lathe B/param  Lathe GiB (rank 0)  paper formula  \
             paper B/param  paper GiB"
        )?;
        let p = StateWidths::ZERO_PAPER;
        for r in &self.rows {
            writeln!(
                f,
                "{:<6} {:<3} {:<14} {:<14.2} {:<19.3} {:<14} {:<14.2} {:.3}",
                r.stage.number(),
                r.world,
                w.formula(r.stage),
                r.lathe_per_param,
                gib(r.lathe_bytes as f64),
                p.formula(r.stage),
                r.paper_per_param,
                gib(r.paper_per_param * self.params as f64)
            )?;
        }
        Ok(())
    }
}

fn mb(bytes: u64) -> String {
    format!("{:.3} MB", bytes as f64 / 1e6)
}

/// The startup report: each rank's measured bytes next to Lathe's formula and the paper's.
pub fn rank_report(
    measured: &[RankMemory],
    params: usize,
    stage: ZeroStage,
    widths: &StateWidths,
) -> String {
    let world = measured.len().max(1);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{stage} over {world} rank(s): model state each rank holds between steps (measured)"
    );
    let _ = writeln!(
        s,
        "rank  master      working     grads       optimizer   total (bytes)         bytes/param"
    );
    for (r, m) in measured.iter().enumerate() {
        let _ = writeln!(
            s,
            "{r:<5} {:<11} {:<11} {:<11} {:<11} {:<21} {:.3}",
            mb(m.master),
            mb(m.working),
            mb(m.grads),
            mb(m.optimizer),
            format!("{} ({})", mb(m.model_state()), m.model_state()),
            m.model_state() as f64 / params.max(1) as f64
        );
    }
    let _ = writeln!(
        s,
        "formula, N = {world}: Lathe {} = {:.3} bytes/param (f32 gradients); ZeRO paper \
         (mixed precision, 2 + 2 + 12) {} = {:.3}",
        widths.formula(stage),
        widths.per_param(stage, world),
        StateWidths::ZERO_PAPER.formula(stage),
        paper_bytes_per_param(stage, world)
    );
    if let Some(m) = measured.first() {
        if m.offloaded {
            let _ = writeln!(
                s,
                "offload: master and optimizer state in host memory, plus {} of staging per \
                 rank (pinned on a device); {} stays with the compute",
                mb(m.staging),
                mb(m.device_resident())
            );
        }
        let _ = writeln!(
            s,
            "CPU backend: autograd's parameter store adds {} per rank between steps and {} \
             while a step runs",
            mb(m.workspace_idle),
            mb(m.workspace_step)
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_formulas() {
        use ZeroStage::*;
        assert_eq!(paper_bytes_per_param(DataParallel, 8), 16.0);
        assert_eq!(paper_bytes_per_param(OptimizerState, 4), 4.0 + 3.0);
        assert_eq!(paper_bytes_per_param(Gradients, 2), 2.0 + 7.0);
        assert_eq!(paper_bytes_per_param(Parameters, 8), 2.0);
        let l = StateWidths::lathe(Precision::Bf16, 2);
        assert_eq!(l.formula(Gradients), "2 + 16/N");
        assert_eq!(l.per_param(Parameters, 2), 9.0);
    }

    #[test]
    fn prediction_sums_to_the_formula_when_shards_divide() {
        let w = StateWidths::lathe(Precision::Fp16, 2);
        for stage in ZeroStage::ALL {
            for world in [1, 2, 4] {
                let m = RankMemory::predict(1000, world, 0, stage, &w, false);
                assert_eq!(
                    m.model_state() as f64,
                    w.per_param(stage, world) * 1000.0,
                    "{stage} N={world}"
                );
            }
        }
        // Uneven: ranks below len % world hold one more element.
        let a = RankMemory::predict(10, 4, 0, ZeroStage::Parameters, &w, true);
        let b = RankMemory::predict(10, 4, 3, ZeroStage::Parameters, &w, true);
        assert_eq!((a.master, b.master), (12, 8));
        assert_eq!((a.staging, b.staging), (18, 12));
    }
}
