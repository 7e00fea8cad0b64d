//! Embedding lookup; its backward is a scatter-add done serially in id order (deterministic,
//! the CPU twin of a GPU kernel that reduces each row in a fixed order instead of atomics).

use rayon::prelude::*;

use crate::error::{Error, Result, shape_err};
use crate::ops::par::rows_per_chunk;
use crate::ops::{Op, Val};
use crate::scalar::Scalar;
use crate::tape::{Tape, Var};
use crate::tensor::numel;

impl<T: Scalar> Tape<T> {
    /// Rows of `table` `(V, C)` picked by `ids` (laid out as `ids_shape`); output
    /// `(ids_shape.., C)` in the table's dtype. Every id must be `< V`.
    pub fn embedding(&mut self, table: Var, ids: &[u32], ids_shape: &[usize]) -> Result<Var> {
        let ts = self.shape(table)?.to_vec();
        if ts.len() != 2 {
            return Err(shape_err(
                "embedding",
                format!("table {ts:?}, expected (V, C)"),
            ));
        }
        if numel(ids_shape) != ids.len() {
            return Err(shape_err(
                "embedding",
                format!(
                    "ids_shape {ids_shape:?} holds {} ids, got {}",
                    numel(ids_shape),
                    ids.len()
                ),
            ));
        }
        if let Some((pos, &id)) = ids
            .iter()
            .enumerate()
            .find(|&(_, &id)| id as usize >= ts[0])
        {
            return Err(Error::Invalid {
                op: "embedding",
                detail: format!(
                    "id {id} at position {pos} is out of range for a table of {} rows",
                    ts[0]
                ),
            });
        }
        let mut out = ids_shape.to_vec();
        out.push(ts[1]);
        Ok(self.record(Op::Embedding { ids: ids.to_vec() }, &[table], vec![out])?[0])
    }
}

pub(crate) fn embedding_forward<T: Scalar>(ids: &[u32], ins: &[Val<T>], out: &mut [T]) {
    let c = ins[0].shape[1];
    if c == 0 {
        return;
    }
    let table = ins[0].data;
    let rpc = rows_per_chunk(c);
    out.par_chunks_mut(rpc * c)
        .zip(ids.par_chunks(rpc))
        .for_each(|(o, ids)| {
            for (row, &id) in o.chunks_mut(c).zip(ids) {
                let id = id as usize;
                row.copy_from_slice(&table[id * c..(id + 1) * c]);
            }
        });
}

pub(crate) fn embedding_backward<T: Scalar>(
    ids: &[u32],
    ins: &[Val<T>],
    g: &[T],
    din: &mut [Option<Vec<T>>],
) {
    let Some(dt) = din[0].as_mut() else { return };
    let c = ins[0].shape[1];
    dt.fill(T::ZERO);
    if c == 0 {
        return;
    }
    for (i, &id) in ids.iter().enumerate() {
        let id = id as usize;
        for (d, &gv) in dt[id * c..(id + 1) * c]
            .iter_mut()
            .zip(&g[i * c..(i + 1) * c])
        {
            *d += gv;
        }
    }
}
