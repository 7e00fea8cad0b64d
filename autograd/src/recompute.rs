//! Activation recomputation (checkpointing).
//!
//! A value can be dropped from the tape after its forward consumers ran; the backward re-runs the
//! forward of the dropped nodes from their kept inputs when a backward step needs them (see
//! `backward.rs`). Because every op is a deterministic function of its inputs and the backward
//! walk is unchanged, losses and gradients are bitwise identical with and without recomputation;
//! only the activation memory (and the time of the extra forwards) changes.
//!
//! Models apply a [`Recompute`] policy with two tools:
//! - [`Tape::drop_for_recompute`] drops one value (policy `act`: GELU and layernorm outputs);
//! - [`Tape::checkpoint`] (or [`Tape::mark`] + [`Tape::drop_since`]) keeps only the inputs and
//!   outputs of a whole segment (policy `block`: a transformer block).

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result, invalid};
use crate::scalar::Scalar;
use crate::tape::{SlotKind, Tape, Var};

/// What a model recomputes in the backward instead of keeping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Recompute {
    /// Keep every activation.
    #[default]
    None,
    /// Drop cheap activations (GELU outputs, layernorm outputs) and recompute them.
    Act,
    /// Keep only each transformer block's input; recompute the whole block.
    Block,
}

impl Recompute {
    /// All policies, cheapest in compute first.
    pub const ALL: [Recompute; 3] = [Recompute::None, Recompute::Act, Recompute::Block];

    /// `none`, `act` or `block` (the CLI spelling).
    pub fn name(self) -> &'static str {
        match self {
            Recompute::None => "none",
            Recompute::Act => "act",
            Recompute::Block => "block",
        }
    }
}

impl fmt::Display for Recompute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Recompute {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "none" | "off" => Ok(Recompute::None),
            "act" | "activations" => Ok(Recompute::Act),
            "block" | "blocks" | "full" => Ok(Recompute::Block),
            _ => Err(invalid(
                "Recompute::from_str",
                format!("unknown policy `{s}` (none, act, block)"),
            )),
        }
    }
}

/// A position on a tape, from [`Tape::mark`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark {
    tape: u32,
    node: usize,
}

impl<T: Scalar> Tape<T> {
    /// Drops the value of `v` (an op output) so that it stops counting as live memory; it is
    /// recomputed from its inputs when the backward (or a later forward op) needs it.
    pub fn drop_for_recompute(&mut self, v: Var) -> Result<()> {
        self.check_recording("drop_for_recompute")?;
        let s = self.slot_index(v)?;
        if self.slots[s].kind != SlotKind::Computed {
            return Err(invalid(
                "drop_for_recompute",
                "inputs and parameters cannot be recomputed",
            ));
        }
        self.free_value(s);
        Ok(())
    }

    /// The current position, to pass to [`Tape::drop_since`].
    pub fn mark(&self) -> Mark {
        Mark {
            tape: self.id,
            node: self.nodes.len(),
        }
    }

    /// Drops every op output recorded since `mark` except `keep` (the segment's outputs).
    pub fn drop_since(&mut self, mark: Mark, keep: &[Var]) -> Result<()> {
        self.check_recording("drop_since")?;
        if mark.tape != self.id || mark.node > self.nodes.len() {
            return Err(invalid(
                "drop_since",
                "the mark comes from another tape or before a clear",
            ));
        }
        let keep = keep
            .iter()
            .map(|&v| self.slot_index(v))
            .collect::<Result<Vec<_>>>()?;
        let first_slot = self
            .nodes
            .get(mark.node)
            .map_or(self.slots.len(), |n| n.first_out);
        for s in first_slot..self.slots.len() {
            // Op outputs, and the parameters of a sharded store first used in the segment
            // (gathered again when the segment is recomputed).
            let droppable = self.slots[s].kind == SlotKind::Computed || self.is_refillable(s);
            if droppable && !keep.contains(&s) {
                self.free_value(s);
            }
        }
        Ok(())
    }

    /// Runs `f` as a checkpointed segment: only its inputs (values recorded before) and its
    /// output are kept; everything `f` computed in between is recomputed in the backward.
    pub fn checkpoint<F>(&mut self, f: F) -> Result<Var>
    where
        F: FnOnce(&mut Self) -> Result<Var>,
    {
        let mark = self.mark();
        let out = f(self)?;
        self.drop_since(mark, &[out])?;
        Ok(out)
    }
}
