//! Typed launches of the kernels the autograd tape's device backend uses: row softmax,
//! cross-entropy with a saved logsumexp, elementwise product and ReLU, a mixed-dtype accumulate, fills from a device
//! scalar, row gather and its deterministic backward, strided 2-D copies and the swap of two
//! axes. Each wrapper checks shapes and buffer lengths before anything reaches the driver,
//! picks the kernel for the element type, and launches on the compute stream; none of them
//! synchronises with the host.

use crate::buffer::{DeviceBuffer, DeviceElem};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::module::KernelArg;
use lathe_kernels::nn::amp::{SCALE, STATE_WORDS};
use lathe_kernels::nn::{embedding, gather, layout, softmax, tape_pointwise, xent};
use lathe_kernels::{Elem, KernelDesc, Problem};

fn invalid(msg: String) -> Error {
    Error::Invalid(msg)
}

fn len_eq(what: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected != got {
        return Err(Error::Length {
            what,
            expected,
            got,
        });
    }
    Ok(())
}

fn to_u32(what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| invalid(format!("{what} = {v} does not fit the kernel's u32")))
}

fn kernel_for(op: &str, e: Elem, k: Option<&'static KernelDesc>) -> Result<&'static KernelDesc> {
    k.ok_or_else(|| invalid(format!("{op} has no kernel for element type {}", e.name())))
}

/// `rows = len / c`, checking `c > 0` and divisibility.
fn rows_of(what: &str, len: usize, c: usize) -> Result<usize> {
    if c == 0 || !len.is_multiple_of(c) {
        return Err(invalid(format!(
            "{what}: {len} elements are not rows of {c}"
        )));
    }
    Ok(len / c)
}

/// A pointer argument `off` elements into `b` (read-only unless `writable`); `off <= len`.
fn at<T: DeviceElem>(b: &DeviceBuffer<T>, off: usize, writable: bool) -> KernelArg {
    KernelArg::Ptr {
        addr: b.addr() + (off * size_of::<T>()) as u64,
        elem: T::ELEM,
        len: b.len() - off,
        writable,
    }
}

/// The elements a strided block of `rows` x `cols` with leading dimension `ld` starting at
/// `off` spans (`off + (rows - 1) ld + cols`), or an error when `ld < cols` or it overflows.
fn block_end(what: &str, off: usize, ld: usize, rows: usize, cols: usize) -> Result<usize> {
    if ld < cols {
        return Err(invalid(format!(
            "{what}: leading dimension {ld} is smaller than the {cols} columns copied"
        )));
    }
    (rows - 1)
        .checked_mul(ld)
        .and_then(|x| x.checked_add(off))
        .and_then(|x| x.checked_add(cols))
        .ok_or_else(|| invalid(format!("{what}: the block's extent overflows")))
}

impl Device {
    /// Launches one elementwise kernel `entry(ptrs..., n)` over `n` elements.
    fn elementwise(
        &self,
        k: &'static KernelDesc,
        mut args: Vec<KernelArg>,
        n: usize,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        args.push(KernelArg::U64(n as u64));
        self.launch(k, &Problem::elems(n as u64), &args, self.compute_stream())
    }

    // ------------------------------------------------------------ softmax

    fn softmax_launch(
        &self,
        k: &'static KernelDesc,
        mut args: Vec<KernelArg>,
        rows: usize,
        c: usize,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        args.push(KernelArg::U32(to_u32("softmax rows", rows)?));
        args.push(KernelArg::U32(to_u32("softmax C", c)?));
        let p = Problem {
            batch: rows as u64,
            n: c as u64,
            k: 1,
            m: 1,
        };
        self.launch(k, &p, &args, self.compute_stream())
    }

    /// `y = softmax(x)` over each row of `c` elements (max-subtracted, f32 math).
    pub fn softmax_forward<T: DeviceElem>(
        &self,
        x: &DeviceBuffer<T>,
        y: &mut DeviceBuffer<T>,
        c: usize,
    ) -> Result<()> {
        let k = kernel_for("softmax", T::ELEM, softmax::forward_for(T::ELEM))?;
        let rows = rows_of("softmax x", x.len(), c)?;
        len_eq("softmax y", x.len(), y.len())?;
        self.softmax_launch(k, vec![x.arg(), y.arg_mut()], rows, c)
    }

    /// Softmax backward from the forward's output: `dx = y (dy - sum_j dy_j y_j)` per row of
    /// `c` elements.
    pub fn softmax_backward<T: DeviceElem>(
        &self,
        y: &DeviceBuffer<T>,
        dy: &DeviceBuffer<T>,
        dx: &mut DeviceBuffer<T>,
        c: usize,
    ) -> Result<()> {
        let k = kernel_for("softmax backward", T::ELEM, softmax::backward_for(T::ELEM))?;
        let rows = rows_of("softmax backward y", y.len(), c)?;
        len_eq("softmax backward dy", y.len(), dy.len())?;
        len_eq("softmax backward dx", y.len(), dx.len())?;
        self.softmax_launch(k, vec![y.arg(), dy.arg(), dx.arg_mut()], rows, c)
    }

    // ------------------------------------------------------------ cross-entropy

    fn xent_shape(what: &str, len: usize, rows: usize, vp: usize, v: usize) -> Result<()> {
        if v == 0 || v > vp {
            return Err(invalid(format!("{what}: V = {v} must be in 1..=Vp = {vp}")));
        }
        let r = rows_of(what, len, vp)?;
        len_eq("cross-entropy targets", r, rows)?;
        to_u32("Vp", vp)?;
        to_u32("rows", rows)?;
        Ok(())
    }

    /// Cross-entropy forward: `losses[r] = lse[r] - logits[r][targets[r]]` (0 for a row whose
    /// target is `ignore_index`, NaN for a target `>= v` that is not) and
    /// `lse[r] = log sum_{j < v} exp(logits[r][j])`, both f32, from `logits (rows, vp)` and
    /// `targets (rows)`. Columns `v..vp` take no part.
    #[allow(clippy::too_many_arguments)]
    pub fn xent_forward<T: DeviceElem>(
        &self,
        logits: &DeviceBuffer<T>,
        targets: &DeviceBuffer<u32>,
        losses: &mut DeviceBuffer<f32>,
        lse: &mut DeviceBuffer<f32>,
        vp: usize,
        v: usize,
        ignore_index: u32,
    ) -> Result<()> {
        let k = kernel_for("cross-entropy", T::ELEM, xent::forward_for(T::ELEM))?;
        let rows = targets.len();
        Self::xent_shape("cross-entropy logits", logits.len(), rows, vp, v)?;
        len_eq("cross-entropy losses", rows, losses.len())?;
        len_eq("cross-entropy lse", rows, lse.len())?;
        if rows == 0 {
            return Ok(());
        }
        let args = [
            logits.arg(),
            targets.arg(),
            losses.arg_mut(),
            lse.arg_mut(),
            KernelArg::U32(rows as u32),
            KernelArg::U32(vp as u32),
            KernelArg::U32(v as u32),
            KernelArg::U32(ignore_index),
        ];
        let p = Problem {
            batch: rows as u64,
            n: vp as u64,
            k: v as u64,
            m: 1,
        };
        self.launch(k, &p, &args, self.compute_stream())
    }

    /// Cross-entropy backward from the saved `lse (rows)`:
    /// `dlogits[r][j] = (exp(logits[r][j] - lse[r]) - [j == targets[r]]) * gscale[0] * factor`
    /// for `j < v`, 0 for `j >= v` and for ignored rows (NaN rows for invalid targets).
    /// `gscale[0]` (the loss's incoming gradient) is read on the device.
    #[allow(clippy::too_many_arguments)]
    pub fn xent_backward<T: DeviceElem>(
        &self,
        logits: &DeviceBuffer<T>,
        lse: &DeviceBuffer<f32>,
        targets: &DeviceBuffer<u32>,
        gscale: &DeviceBuffer<f32>,
        factor: f32,
        dlogits: &mut DeviceBuffer<T>,
        vp: usize,
        v: usize,
        ignore_index: u32,
    ) -> Result<()> {
        let k = kernel_for(
            "cross-entropy backward",
            T::ELEM,
            xent::backward_for(T::ELEM),
        )?;
        let rows = targets.len();
        Self::xent_shape("cross-entropy backward logits", logits.len(), rows, vp, v)?;
        len_eq(
            "cross-entropy backward dlogits",
            logits.len(),
            dlogits.len(),
        )?;
        len_eq("cross-entropy backward lse", rows, lse.len())?;
        if gscale.is_empty() {
            return Err(invalid(
                "cross-entropy backward: gscale must hold at least one f32".into(),
            ));
        }
        if rows == 0 {
            return Ok(());
        }
        let args = [
            logits.arg(),
            lse.arg(),
            targets.arg(),
            gscale.arg(),
            dlogits.arg_mut(),
            KernelArg::U32(rows as u32),
            KernelArg::U32(vp as u32),
            KernelArg::U32(v as u32),
            KernelArg::U32(ignore_index),
            KernelArg::F32(factor),
        ];
        let p = Problem {
            batch: rows as u64,
            n: vp as u64,
            k: v as u64,
            m: 1,
        };
        self.launch(k, &p, &args, self.compute_stream())
    }

    // ------------------------------------------------------------ fills from a device scalar

    fn fill_scalar_launch<T: DeviceElem>(
        &self,
        src: KernelArg,
        factor: f32,
        out: &mut DeviceBuffer<T>,
    ) -> Result<()> {
        let k = kernel_for(
            "fill from a scalar",
            T::ELEM,
            tape_pointwise::fill_scalar_for(T::ELEM),
        )?;
        if out.is_empty() {
            return Ok(());
        }
        let n = out.len() as u64;
        let args = [
            src,
            out.arg_mut(),
            KernelArg::U64(n),
            KernelArg::F32(factor),
        ];
        self.launch(k, &Problem::elems(n), &args, self.compute_stream())
    }

    /// `out[i] = src[index] * factor` (rounded to `T`), `src[index]` read on the device.
    pub fn fill_from_scalar<T: DeviceElem>(
        &self,
        src: &DeviceBuffer<f32>,
        index: usize,
        factor: f32,
        out: &mut DeviceBuffer<T>,
    ) -> Result<()> {
        if index >= src.len() {
            return Err(invalid(format!(
                "fill from a scalar: index {index} is outside a buffer of {}",
                src.len()
            )));
        }
        self.fill_scalar_launch(at(src, index, false), factor, out)
    }

    /// `out[i] = scale * factor` with `scale` the step state's loss scale (word
    /// [`SCALE`], an f32), read on the device: the seed of a scaled backward.
    pub fn fill_from_state_scale(
        &self,
        state: &DeviceBuffer<u32>,
        factor: f32,
        out: &mut DeviceBuffer<f32>,
    ) -> Result<()> {
        len_eq("step state", STATE_WORDS, state.len())?;
        // The state's words from SCALE on, as the f32 they hold at SCALE: the kernel reads one
        // f32 there, and the range granted ends with the state buffer.
        let src = KernelArg::Ptr {
            addr: state.addr() + (SCALE * size_of::<u32>()) as u64,
            elem: Elem::F32,
            len: STATE_WORDS - SCALE,
            writable: false,
        };
        self.fill_scalar_launch(src, factor, out)
    }

    // ------------------------------------------------------------ pointwise

    /// `out[i] = a[i] * b[i]` (f32 math, one rounding). The backward of a product is two more
    /// products.
    pub fn mul<T: DeviceElem>(
        &self,
        a: &DeviceBuffer<T>,
        b: &DeviceBuffer<T>,
        out: &mut DeviceBuffer<T>,
    ) -> Result<()> {
        let k = kernel_for("mul", T::ELEM, tape_pointwise::mul_for(T::ELEM))?;
        len_eq("mul b", a.len(), b.len())?;
        len_eq("mul out", a.len(), out.len())?;
        self.elementwise(k, vec![a.arg(), b.arg(), out.arg_mut()], a.len())
    }

    /// `y[i] = x[i] > 0 ? x[i] : 0`.
    pub fn relu_forward<T: DeviceElem>(
        &self,
        x: &DeviceBuffer<T>,
        y: &mut DeviceBuffer<T>,
    ) -> Result<()> {
        let k = kernel_for("relu", T::ELEM, tape_pointwise::relu_fwd_for(T::ELEM))?;
        len_eq("relu y", x.len(), y.len())?;
        self.elementwise(k, vec![x.arg(), y.arg_mut()], x.len())
    }

    /// `dx[i] = y[i] > 0 ? dy[i] : 0` from the forward's output `y`.
    pub fn relu_backward<T: DeviceElem>(
        &self,
        y: &DeviceBuffer<T>,
        dy: &DeviceBuffer<T>,
        dx: &mut DeviceBuffer<T>,
    ) -> Result<()> {
        let k = kernel_for(
            "relu backward",
            T::ELEM,
            tape_pointwise::relu_bwd_for(T::ELEM),
        )?;
        len_eq("relu backward dy", y.len(), dy.len())?;
        len_eq("relu backward dx", y.len(), dx.len())?;
        self.elementwise(k, vec![y.arg(), dy.arg(), dx.arg_mut()], y.len())
    }

    /// `y[i] += x[i]` with `x` and `y` of any two of f32 / bf16 / f16: f32 math, `y` rounded
    /// to nearest even once (gradient accumulation across dtypes).
    pub fn add_into<X: DeviceElem, Y: DeviceElem>(
        &self,
        x: &DeviceBuffer<X>,
        y: &mut DeviceBuffer<Y>,
    ) -> Result<()> {
        let k = tape_pointwise::add_into_for(X::ELEM, Y::ELEM).ok_or_else(|| {
            invalid(format!(
                "add_into has no kernel from {} into {}",
                X::ELEM.name(),
                Y::ELEM.name()
            ))
        })?;
        len_eq("add_into y", x.len(), y.len())?;
        self.elementwise(k, vec![x.arg(), y.arg_mut()], x.len())
    }

    /// `y[offset + i] += x[i]` for `i < x.len()`: [`Device::add_into`] on a slice of `y` (a
    /// parameter's gradient inside the flat gradient buffer).
    pub fn add_into_at<X: DeviceElem, Y: DeviceElem>(
        &self,
        x: &DeviceBuffer<X>,
        y: &mut DeviceBuffer<Y>,
        offset: usize,
    ) -> Result<()> {
        let k = tape_pointwise::add_into_for(X::ELEM, Y::ELEM).ok_or_else(|| {
            invalid(format!(
                "add_into has no kernel from {} into {}",
                X::ELEM.name(),
                Y::ELEM.name()
            ))
        })?;
        let end = offset.checked_add(x.len());
        if end.is_none_or(|e| e > y.len()) {
            return Err(invalid(format!(
                "add_into_at: {} elements at offset {offset} do not fit a buffer of {}",
                x.len(),
                y.len()
            )));
        }
        let y_at = KernelArg::Ptr {
            addr: y.addr() + (offset * size_of::<Y>()) as u64,
            elem: Y::ELEM,
            len: x.len(),
            writable: true,
        };
        self.elementwise(k, vec![x.arg(), y_at], x.len())
    }

    // ------------------------------------------------------------ gather

    /// `out[n, :] = table[ids[n], :]` for `ids (N)`, `table (rows, c)`, `out (N, c)`; an id
    /// `>= rows` gives a NaN row.
    pub fn gather_rows<T: DeviceElem>(
        &self,
        ids: &DeviceBuffer<u32>,
        table: &DeviceBuffer<T>,
        out: &mut DeviceBuffer<T>,
        c: usize,
    ) -> Result<()> {
        let k = kernel_for("gather_rows", T::ELEM, gather::kernel_for(T::ELEM))?;
        let rows = rows_of("gather_rows table", table.len(), c)?;
        let n = ids.len();
        len_eq("gather_rows out", n.saturating_mul(c), out.len())?;
        if n == 0 {
            return Ok(());
        }
        let args = [
            ids.arg(),
            table.arg(),
            out.arg_mut(),
            KernelArg::U32(to_u32("ids", n)?),
            KernelArg::U32(to_u32("C", c)?),
            KernelArg::U32(to_u32("table rows", rows)?),
        ];
        let p = Problem {
            batch: n as u64,
            n: c as u64,
            k: rows as u64,
            m: 1,
        };
        self.launch(k, &p, &args, self.compute_stream())
    }

    /// Backward of [`Device::gather_rows`]: `dtable[ids[n], :] += dout[n, :]` into
    /// `dtable (rows, c)` f32, deterministically (each row sums its ids in ascending `n`, no
    /// atomics). Ids `>= rows` contribute nothing; rows no id names are untouched.
    ///
    /// Runs the embedding's token-gradient kernel: it compares ids unsigned against the row
    /// count (`setp.lt.u32`), so a u32 id means the same there as the i32 token with its bits.
    pub fn gather_rows_backward<T: DeviceElem>(
        &self,
        ids: &DeviceBuffer<u32>,
        dout: &DeviceBuffer<T>,
        dtable: &mut DeviceBuffer<f32>,
        c: usize,
    ) -> Result<()> {
        let k = kernel_for(
            "gather_rows backward",
            T::ELEM,
            embedding::backward_tok_for(T::ELEM),
        )?;
        let rows = rows_of("gather_rows backward dtable", dtable.len(), c)?;
        let n = ids.len();
        len_eq("gather_rows backward dout", n.saturating_mul(c), dout.len())?;
        if n == 0 {
            return Ok(());
        }
        let tokens = KernelArg::Ptr {
            addr: ids.addr(),
            elem: Elem::I32,
            len: n,
            writable: false,
        };
        let args = [
            tokens,
            dout.arg(),
            dtable.arg_mut(),
            KernelArg::U32(to_u32("ids", n)?),
            KernelArg::U32(to_u32("C", c)?),
            KernelArg::U32(to_u32("table rows", rows)?),
        ];
        let p = Problem {
            batch: n as u64,
            n: c as u64,
            m: 1,
            k: rows as u64,
        };
        self.launch(k, &p, &args, self.compute_stream())
    }

    // ------------------------------------------------------------ layout copies

    /// `dst[dst_off + r dst_ld + j] = src[src_off + r src_ld + j]` for `r < rows`,
    /// `j < cols`: a bit-exact strided block copy (split, concat, slices along any dim).
    #[allow(clippy::too_many_arguments)]
    pub fn copy_2d<T: DeviceElem>(
        &self,
        src: &DeviceBuffer<T>,
        src_off: usize,
        src_ld: usize,
        dst: &mut DeviceBuffer<T>,
        dst_off: usize,
        dst_ld: usize,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let k = kernel_for("copy_2d", T::ELEM, layout::copy2d_for(T::ELEM))?;
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        let s_end = block_end("copy_2d source", src_off, src_ld, rows, cols)?;
        let d_end = block_end("copy_2d destination", dst_off, dst_ld, rows, cols)?;
        if s_end > src.len() || d_end > dst.len() {
            return Err(invalid(format!(
                "copy_2d: a {rows} x {cols} block needs {s_end} source and {d_end} destination \
                 elements, the buffers hold {} and {}",
                src.len(),
                dst.len()
            )));
        }
        let count = rows
            .checked_mul(cols)
            .ok_or_else(|| invalid("copy_2d: rows x cols overflows".into()))?;
        to_u32("copy_2d rows x cols", count)?;
        let args = [
            at(src, src_off, false),
            at(dst, dst_off, true),
            KernelArg::U32(rows as u32),
            KernelArg::U32(cols as u32),
            KernelArg::U32(to_u32("copy_2d src_ld", src_ld)?),
            KernelArg::U32(to_u32("copy_2d dst_ld", dst_ld)?),
        ];
        self.launch(
            k,
            &Problem::elems(count as u64),
            &args,
            self.compute_stream(),
        )
    }

    /// Swaps two axes: `x` viewed as `[a, d0, b, d1, c]` (`dims`) into `y` as
    /// `[a, d1, b, d0, c]`. Bit exact.
    pub fn swap_axes<T: DeviceElem>(
        &self,
        x: &DeviceBuffer<T>,
        y: &mut DeviceBuffer<T>,
        dims: [usize; 5],
    ) -> Result<()> {
        let k = kernel_for("swap_axes", T::ELEM, layout::swap_axes_for(T::ELEM))?;
        let n = dims
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| invalid(format!("swap_axes: dims {dims:?} overflow")))?;
        len_eq("swap_axes x", n, x.len())?;
        len_eq("swap_axes y", n, y.len())?;
        if n == 0 {
            return Ok(());
        }
        to_u32("swap_axes elements", n)?;
        let mut args = vec![x.arg(), y.arg_mut()];
        args.extend(dims.iter().map(|&d| KernelArg::U32(d as u32)));
        self.launch(k, &Problem::elems(n as u64), &args, self.compute_stream())
    }
}
