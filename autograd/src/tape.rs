//! The tape: an arena of values and the ops that produced them.
//!
//! Ops are methods on [`Tape`] (`tape.matmul(a, b, false, false)`) that run their forward at once
//! and record a node; a [`Var`] is a `Copy` handle to one output. [`Tape::backward`] (in
//! `backward.rs`) walks the nodes in reverse.
//!
//! Memory accounting: the tape counts the bytes of live activation storage, at the storage dtype
//! of each value (2 bytes per bf16 element, 4 per f32), and of live activation gradients. Values
//! are live from their forward until the backward no longer needs them; values dropped for
//! recomputation stop counting until they are recomputed. Parameters copied onto the tape are
//! counted apart ([`Tape::param_bytes`]). [`Tape::peak_activation_bytes`] is the high-water mark.
//!
//! A dry-run tape ([`Tape::dry_run`]) records shapes and does the same accounting without
//! computing or allocating any values: it measures activation memory at shapes too large to run.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};

use rayon::prelude::*;

use crate::autocast;
use crate::device::ops::DIn;
use crate::device::{DevBuf, DevCtx};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::attention::AttentionPath;
use crate::ops::{self, Op, Val};
use crate::params::ParamStore;
use crate::scalar::Scalar;
use crate::tensor::{Tensor, numel};

static NEXT_TAPE_ID: AtomicU32 = AtomicU32::new(1);

fn next_id() -> u32 {
    NEXT_TAPE_ID.fetch_add(1, Ordering::Relaxed)
}

/// A handle to one value on a [`Tape`]. Cheap to copy; only meaningful on the tape (and before
/// the [`Tape::clear`]) that created it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Var {
    pub(crate) idx: u32,
    pub(crate) tape: u32,
}

impl Var {
    /// Position of the value on its tape (creation order).
    pub fn index(self) -> usize {
        self.idx as usize
    }
}

/// What kind of value a slot holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SlotKind {
    /// Output of an op: may be freed and recomputed.
    Computed,
    /// Data given to the tape (never freed before `clear`).
    Input,
    /// A copy of a parameter's working values; its gradient goes to the store at `offset`.
    Param { offset: usize },
}

pub(crate) struct Slot<T> {
    pub node: usize,
    pub shape: Vec<usize>,
    /// Storage dtype (autocast policy).
    pub dtype: DType,
    pub requires_grad: bool,
    pub kind: SlotKind,
    pub value: Option<Vec<T>>,
    pub grad: Option<Vec<T>>,
    /// The value on the device (device tapes only).
    pub dvalue: Option<DevBuf>,
    /// The gradient on the device (device tapes only).
    pub dgrad: Option<DevBuf>,
    /// Kept through `backward` (the loss).
    pub pinned: bool,
}

impl<T> Slot<T> {
    /// Whether the value is present (on the host or on the device).
    pub fn has_value(&self) -> bool {
        self.value.is_some() || self.dvalue.is_some()
    }
    /// Whether the gradient is present (on the host or on the device).
    pub fn has_grad(&self) -> bool {
        self.grad.is_some() || self.dgrad.is_some()
    }
}

pub(crate) struct Node {
    pub op: Op,
    pub inputs: Vec<usize>,
    pub first_out: usize,
    pub n_out: usize,
}

impl Node {
    pub fn outputs(&self) -> std::ops::Range<usize> {
        self.first_out..self.first_out + self.n_out
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    Recording,
    InBackward,
    Backpropagated,
}

/// The value a leaf starts with.
enum Leaf<T> {
    Host(Vec<T>),
    Device(DevBuf),
}

/// Recycles buffers by exact length (a training step allocates the same sizes every step).
/// Recycled buffers hold stale values: every kernel overwrites its outputs.
pub(crate) struct Pool<T> {
    free: HashMap<usize, Vec<Vec<T>>>,
}

impl<T: Scalar> Pool<T> {
    fn new() -> Self {
        Pool {
            free: HashMap::new(),
        }
    }
    /// A buffer of `len` elements with unspecified contents.
    pub fn take(&mut self, len: usize) -> Vec<T> {
        match self.free.get_mut(&len).and_then(|v| v.pop()) {
            Some(b) => b,
            None => vec![T::ZERO; len],
        }
    }
    /// Returns a buffer for reuse.
    pub fn give(&mut self, buf: Vec<T>) {
        if !buf.is_empty() {
            self.free.entry(buf.len()).or_default().push(buf);
        }
    }
}

/// Records ops and their values; differentiates them with [`Tape::backward`].
///
/// `T` is the scalar the CPU computes in: `f32` for training, `f64` for gradient checks. The
/// compute dtype decides how values are stored (see [`crate::autocast`]).
pub struct Tape<T: Scalar = f32> {
    pub(crate) id: u32,
    pub(crate) dtype: DType,
    pub(crate) dry: bool,
    pub(crate) nodes: Vec<Node>,
    pub(crate) slots: Vec<Slot<T>>,
    pub(crate) pool: Pool<T>,
    /// Parameter leaves by offset, with the store stamp they were copied at.
    param_vars: HashMap<usize, ((u64, u64), usize)>,
    /// Parameter leaves of a sharded device store, by slot: the store's gather hook and the
    /// parameter's flat range. Their values may be dropped (by [`Tape::drop_since`] and after
    /// their last use in the backward) and gathered again when needed.
    param_refill: HashMap<usize, (crate::device::ParamGatherHook, std::ops::Range<usize>)>,
    pub(crate) param_len: Option<usize>,
    pub(crate) live: usize,
    pub(crate) peak: usize,
    param_bytes: usize,
    /// Bytes of parameter leaves holding their values now, and the high-water mark.
    live_params: usize,
    peak_params: usize,
    pub(crate) recomputed: usize,
    pub(crate) phase: Phase,
    pub(crate) profile: Option<Vec<OpProfile>>,
    events: Vec<OpEvent>,
    /// The device backend (values in device buffers, ops as kernels); `None` on the CPU.
    pub(crate) dev: Option<DevCtx>,
    /// Called as each parameter's gradient becomes final during `backward`.
    pub(crate) grad_ready: Option<GradReadyHook<T>>,
    /// What [`Tape::attention`] records.
    pub(crate) attention_path: AttentionPath,
}

/// A gradient-ready hook ([`Tape::set_grad_ready_hook`]): called with the parameter store
/// and the flat range of one parameter whose gradient `backward` just finished adding in.
pub type GradReadyHook<T> =
    Box<dyn FnMut(&mut ParamStore<T>, std::ops::Range<usize>) -> Result<()> + Send + Sync>;

/// Most [`OpEvent`]s a tape keeps between two [`Tape::take_events`].
pub const MAX_EVENTS: usize = 1 << 16;

/// One timed kernel run, recorded while profiling is on ([`Tape::take_events`]); enough for a
/// host-side trace (Chrome trace "X" events).
#[derive(Clone, Debug)]
pub struct OpEvent {
    /// Op name.
    pub op: &'static str,
    /// True for a backward kernel, false for a forward (recomputations included).
    pub backward: bool,
    /// When the kernel started.
    pub start: std::time::Instant,
    /// How long it ran, in seconds.
    pub secs: f64,
}

/// Time spent in one kind of op since profiling was enabled ([`Tape::set_profiling`]).
#[derive(Clone, Debug, PartialEq)]
pub struct OpProfile {
    /// Op name (`matmul`, `attention`, ...).
    pub op: &'static str,
    /// Forward runs (recomputations included).
    pub forward_calls: usize,
    /// Total forward seconds.
    pub forward_secs: f64,
    /// Backward runs.
    pub backward_calls: usize,
    /// Total backward seconds.
    pub backward_secs: f64,
}

impl<T: Scalar> Tape<T> {
    /// Starts timing every forward and backward kernel ([`Tape::profile`] sums by op name,
    /// [`Tape::take_events`] lists the runs), or stops and discards what was collected.
    /// Profiling is kept across [`Tape::clear`].
    pub fn set_profiling(&mut self, on: bool) {
        if !on {
            self.events.clear();
        }
        self.profile = if on {
            Some(self.profile.take().unwrap_or_default())
        } else {
            None
        };
    }

    /// Time per op kind, most expensive first (empty when profiling is off).
    pub fn profile(&self) -> Vec<OpProfile> {
        let mut v = self.profile.clone().unwrap_or_default();
        v.sort_by(|a, b| {
            (b.forward_secs + b.backward_secs).total_cmp(&(a.forward_secs + a.backward_secs))
        });
        v
    }

    /// The kernel runs timed since the last call (only while profiling is on; at most
    /// [`MAX_EVENTS`] are kept between two calls, later ones are dropped).
    pub fn take_events(&mut self) -> Vec<OpEvent> {
        std::mem::take(&mut self.events)
    }

    pub(crate) fn record_time(
        &mut self,
        op: &'static str,
        backward: bool,
        start: std::time::Instant,
        secs: f64,
    ) {
        if let Some(p) = self.profile.as_mut() {
            if self.events.len() < MAX_EVENTS {
                self.events.push(OpEvent {
                    op,
                    backward,
                    start,
                    secs,
                });
            }
            let i = match p.iter().position(|e| e.op == op) {
                Some(i) => i,
                None => {
                    p.push(OpProfile {
                        op,
                        forward_calls: 0,
                        forward_secs: 0.0,
                        backward_calls: 0,
                        backward_secs: 0.0,
                    });
                    p.len() - 1
                }
            };
            if backward {
                p[i].backward_calls += 1;
                p[i].backward_secs += secs;
            } else {
                p[i].forward_calls += 1;
                p[i].forward_secs += secs;
            }
        }
    }
}

impl Tape<f32> {
    /// An f32 tape computing in `dtype` (storage of low-precision values is emulated).
    pub fn new(dtype: DType) -> Self {
        Self::with_dtype(dtype)
    }

    /// A tape on `device` (a GPU or the simulated device) computing in `dtype`: values and
    /// gradients live in device buffers of their storage dtype, every op launches Lathe's
    /// kernels on the device's compute stream (see [`crate::device`]). Its parameters must come
    /// from a store moved to the same device ([`ParamStore::to_device`]).
    pub fn on_device(dtype: DType, device: &lathe_host::Device) -> Self {
        Tape {
            dev: Some(DevCtx::new(device.clone())),
            ..Self::with_dtype(dtype)
        }
    }
}

impl<T: Scalar> Tape<T> {
    /// A tape computing in scalar `T` with compute dtype `dtype`.
    pub fn with_dtype(dtype: DType) -> Self {
        Tape {
            id: next_id(),
            dtype,
            dry: false,
            nodes: Vec::new(),
            slots: Vec::new(),
            pool: Pool::new(),
            param_vars: HashMap::new(),
            param_refill: HashMap::new(),
            live_params: 0,
            peak_params: 0,
            param_len: None,
            live: 0,
            peak: 0,
            param_bytes: 0,
            recomputed: 0,
            phase: Phase::Recording,
            profile: None,
            events: Vec::new(),
            dev: None,
            grad_ready: None,
            attention_path: AttentionPath::Auto,
        }
    }

    /// A tape that records shapes and counts memory exactly like a real one but computes and
    /// stores no values (reading a value is an error). Accepts a [`ParamStore::layout`] store.
    pub fn dry_run(dtype: DType) -> Self {
        Tape {
            dry: true,
            ..Self::with_dtype(dtype)
        }
    }

    /// Installs (or removes) a hook `backward` calls as soon as a parameter's gradient is
    /// final: the walk reaches a parameter's leaf after every op that used it, in reverse
    /// creation order, so the last layers' gradients are ready first. A data-parallel trainer
    /// starts reducing a bucket of gradients there while the backward goes on with the
    /// earlier layers. Kept across [`Tape::clear`].
    pub fn set_grad_ready_hook(&mut self, hook: Option<GradReadyHook<T>>) {
        self.grad_ready = hook;
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// True for a [`Tape::dry_run`] tape.
    pub fn is_dry_run(&self) -> bool {
        self.dry
    }
    /// Number of recorded nodes (leaves included).
    pub fn num_nodes(&self) -> usize {
        self.nodes.len()
    }
    /// Nodes whose forward was re-run to recompute dropped values (cumulative; kept by `clear`).
    pub fn recomputed_nodes(&self) -> usize {
        self.recomputed
    }

    /// Empties the tape for the next step. Buffers are kept for reuse; the peak is kept (see
    /// [`Tape::reset_peak`]). Vars of the old contents become invalid.
    pub fn clear(&mut self) {
        for s in self.slots.drain(..) {
            if let Some(v) = s.value {
                self.pool.give(v);
            }
            if let Some(g) = s.grad {
                self.pool.give(g);
            }
        }
        if let Some(d) = self.dev.as_mut() {
            d.node_ids.clear();
        }
        self.nodes.clear();
        self.param_vars.clear();
        self.param_refill.clear();
        self.param_len = None;
        self.live = 0;
        self.param_bytes = 0;
        self.live_params = 0;
        self.phase = Phase::Recording;
        self.id = next_id();
    }

    /// Drops the recycled buffers (returns their memory to the allocator).
    pub fn release_buffers(&mut self) {
        self.pool = Pool::new();
    }

    // ---- memory accounting -------------------------------------------------------------------

    /// Bytes of activation values and activation gradients alive now.
    pub fn live_activation_bytes(&self) -> usize {
        self.live
    }
    /// High-water mark of [`Tape::live_activation_bytes`] since creation or [`Tape::reset_peak`].
    pub fn peak_activation_bytes(&self) -> usize {
        self.peak
    }
    /// Restarts the high-water mark from the current live bytes.
    pub fn reset_peak(&mut self) {
        self.peak = self.live;
        self.peak_params = self.live_params;
    }
    /// Bytes of parameter working copies on the tape (not counted as activations).
    pub fn param_bytes(&self) -> usize {
        self.param_bytes
    }
    /// The most bytes of parameter working copies the tape held at once (kept by `clear`,
    /// reset by [`Tape::reset_peak`]). Below [`Tape::param_bytes`] when a sharded store's
    /// parameters were dropped after use and gathered again ([`Tape::drop_since`]).
    pub fn peak_param_bytes(&self) -> usize {
        self.peak_params
    }

    /// Bytes of slot `s`'s value when it is a parameter leaf (0 otherwise).
    fn param_value_bytes(&self, s: usize) -> usize {
        let slot = &self.slots[s];
        match slot.kind {
            SlotKind::Param { .. } => numel(&slot.shape) * slot.dtype.size_of(),
            _ => 0,
        }
    }

    fn param_value_set(&mut self, s: usize) {
        self.live_params += self.param_value_bytes(s);
        self.peak_params = self.peak_params.max(self.live_params);
    }

    fn counted(&self, s: usize) -> usize {
        let slot = &self.slots[s];
        match slot.kind {
            SlotKind::Param { .. } => 0,
            _ => numel(&slot.shape) * slot.dtype.size_of(),
        }
    }

    pub(crate) fn set_value(&mut self, s: usize, buf: Vec<T>) {
        debug_assert!(self.slots[s].value.is_none());
        self.slots[s].value = Some(buf);
        self.live += self.counted(s);
        self.peak = self.peak.max(self.live);
        self.param_value_set(s);
    }

    pub(crate) fn free_value(&mut self, s: usize) {
        if let Some(v) = self.slots[s].value.take() {
            self.live -= self.counted(s);
            self.live_params -= self.param_value_bytes(s);
            self.pool.give(v);
        }
        if self.slots[s].dvalue.take().is_some() {
            self.live -= self.counted(s);
            self.live_params -= self.param_value_bytes(s);
        }
    }

    pub(crate) fn set_dvalue(&mut self, s: usize, buf: DevBuf) {
        debug_assert!(!self.slots[s].has_value());
        self.slots[s].dvalue = Some(buf);
        self.live += self.counted(s);
        self.peak = self.peak.max(self.live);
        self.param_value_set(s);
    }

    pub(crate) fn set_dgrad(&mut self, s: usize, buf: DevBuf) {
        debug_assert!(!self.slots[s].has_grad());
        self.slots[s].dgrad = Some(buf);
        self.live += self.counted(s);
        self.peak = self.peak.max(self.live);
    }

    pub(crate) fn set_grad(&mut self, s: usize, buf: Vec<T>) {
        debug_assert!(self.slots[s].grad.is_none());
        self.slots[s].grad = Some(buf);
        self.live += self.counted(s);
        self.peak = self.peak.max(self.live);
    }

    pub(crate) fn free_grad(&mut self, s: usize) {
        if let Some(g) = self.slots[s].grad.take() {
            self.live -= self.counted(s);
            self.pool.give(g);
        }
        if self.slots[s].dgrad.take().is_some() {
            self.live -= self.counted(s);
        }
    }

    // ---- handles ----------------------------------------------------------------------------

    pub(crate) fn slot_index(&self, v: Var) -> Result<usize> {
        if v.tape != self.id || v.index() >= self.slots.len() {
            return Err(Error::ForeignVar { index: v.idx });
        }
        Ok(v.index())
    }

    pub(crate) fn var(&self, s: usize) -> Var {
        Var {
            idx: s as u32,
            tape: self.id,
        }
    }

    pub(crate) fn check_recording(&self, op: &'static str) -> Result<()> {
        if self.phase != Phase::Recording {
            return Err(Error::Invalid {
                op,
                detail: "the tape was already back-propagated; call Tape::clear() first".into(),
            });
        }
        Ok(())
    }

    /// Shape of `v`.
    pub fn shape(&self, v: Var) -> Result<&[usize]> {
        Ok(&self.slots[self.slot_index(v)?].shape)
    }
    /// Storage dtype of `v`.
    pub fn dtype_of(&self, v: Var) -> Result<DType> {
        Ok(self.slots[self.slot_index(v)?].dtype)
    }
    /// Whether gradients flow to `v`.
    pub fn requires_grad(&self, v: Var) -> Result<bool> {
        Ok(self.slots[self.slot_index(v)?].requires_grad)
    }

    /// The values of `v` (row-major). Fails if the value was dropped for recomputation (see
    /// [`Tape::materialize`]), freed by `backward`, or if the tape is a dry run.
    pub fn value(&self, v: Var) -> Result<&[T]> {
        let s = self.slot_index(v)?;
        if self.dry {
            return Err(Error::Unavailable {
                index: v.idx,
                detail: "a dry-run tape holds no values".into(),
            });
        }
        if self.slots[s].dvalue.is_some() {
            return Err(Error::Unavailable {
                index: v.idx,
                detail: "the value is on the device: read it with Tape::read (an explicit copy \
                         to the host) or use Tape::device_value"
                    .into(),
            });
        }
        self.slots[s]
            .value
            .as_deref()
            .ok_or_else(|| Error::Unavailable {
                index: v.idx,
                detail: match self.phase {
                    Phase::Recording => {
                        "dropped for recomputation; call Tape::materialize first".into()
                    }
                    _ => "freed by backward; read values before backward".into(),
                },
            })
    }

    /// Recomputes `v` if it was dropped for recomputation.
    pub fn materialize(&mut self, v: Var) -> Result<()> {
        let s = self.slot_index(v)?;
        self.check_recording("materialize")?;
        self.ensure(&[s])?;
        Ok(())
    }

    /// A copy of `v` as a tensor (on a device tape, an explicit read: see [`Tape::read`]).
    pub fn tensor(&self, v: Var) -> Result<Tensor<T>> {
        let s = self.slot_index(v)?;
        let data = self.read(v)?;
        Tensor::new(self.slots[s].shape.clone(), data, self.slots[s].dtype)
    }

    /// A host copy of the values of `v`. On a device tape this copies the value to the host
    /// and waits for the device: the one way values leave the device, so keep it out of a
    /// training step's hot path (the trainer reads its loss a step behind instead).
    pub fn read(&self, v: Var) -> Result<Vec<T>> {
        let s = self.slot_index(v)?;
        if let Some(d) = &self.slots[s].dvalue {
            return Ok(d
                .download()?
                .iter()
                .map(|&x| T::from_f64(x as f64))
                .collect());
        }
        Ok(self.value(v)?.to_vec())
    }

    /// The device buffer holding `v` (device tapes only).
    pub fn device_value(&self, v: Var) -> Result<&DevBuf> {
        let s = self.slot_index(v)?;
        self.slots[s]
            .dvalue
            .as_ref()
            .ok_or_else(|| Error::Unavailable {
                index: v.idx,
                detail: if self.dev.is_none() {
                    "this tape runs on the CPU; use Tape::value".into()
                } else {
                    "dropped for recomputation or freed by backward".into()
                },
            })
    }

    /// Declares `dev` (already on this tape's device, e.g. a batch uploaded through pinned
    /// memory on the copy stream) as the device copy of the token ids or targets `host`:
    /// ops given an equal `&[u32]` (`embedding`, `cross_entropy`) read it instead of
    /// uploading. Without it a device tape uploads an id array the first time it meets it
    /// and keeps the last few for later steps. A no-op on the CPU.
    pub fn bind_ids(&mut self, host: &[u32], dev: &lathe_host::DeviceBuffer<u32>) -> Result<()> {
        match self.dev.as_mut() {
            Some(ctx) => ctx.bind(host, dev),
            None => Ok(()),
        }
    }

    /// The device this tape runs on (`None` for the CPU reference backend).
    pub fn device(&self) -> Option<&lathe_host::Device> {
        self.dev.as_ref().map(|d| &d.dev)
    }

    /// The single value of a one-element `v` (a loss); an explicit read on a device tape.
    pub fn scalar(&self, v: Var) -> Result<T> {
        let data = self.read(v)?;
        if data.len() != 1 {
            return Err(Error::Shape {
                op: "scalar",
                detail: format!(
                    "expected one element, {:?} has {}",
                    self.shape(v)?,
                    data.len()
                ),
            });
        }
        Ok(data[0])
    }

    /// The gradient of `v` after `backward`: kept for inputs created with `requires_grad`
    /// ([`Tape::leaf`]); activation gradients are freed as the backward walks past them and
    /// parameter gradients go to the [`ParamStore`].
    pub fn grad(&self, v: Var) -> Result<Option<&[T]>> {
        let s = self.slot_index(v)?;
        Ok(self.slots[s].grad.as_deref())
    }

    /// A host copy of the gradient of `v` after `backward` ([`Tape::grad`] on either
    /// backend; an explicit read from a device tape).
    pub fn read_grad(&self, v: Var) -> Result<Option<Vec<T>>> {
        let s = self.slot_index(v)?;
        if let Some(d) = &self.slots[s].dgrad {
            let vals = d.download()?;
            return Ok(Some(vals.iter().map(|&x| T::from_f64(x as f64)).collect()));
        }
        Ok(self.slots[s].grad.clone())
    }

    // ---- leaves ------------------------------------------------------------------------------

    fn push_leaf(
        &mut self,
        shape: Vec<usize>,
        dtype: DType,
        data: Leaf<T>,
        requires_grad: bool,
        kind: SlotKind,
    ) -> Var {
        let node = self.nodes.len();
        let s = self.slots.len();
        self.slots.push(Slot {
            node,
            shape,
            dtype,
            requires_grad,
            kind,
            value: None,
            grad: None,
            dvalue: None,
            dgrad: None,
            pinned: false,
        });
        self.nodes.push(Node {
            op: Op::Leaf,
            inputs: Vec::new(),
            first_out: s,
            n_out: 1,
        });
        match data {
            Leaf::Host(d) => self.set_value(s, d),
            Leaf::Device(d) => self.set_dvalue(s, d),
        }
        self.var(s)
    }

    /// Data that needs no gradient (a batch of inputs). Counted as activation memory.
    pub fn input(&mut self, t: Tensor<T>) -> Result<Var> {
        self.leaf(t, false)
    }

    /// A leaf value; with `requires_grad` its gradient is kept after `backward`
    /// ([`Tape::grad`]).
    pub fn leaf(&mut self, t: Tensor<T>, requires_grad: bool) -> Result<Var> {
        self.check_recording("leaf")?;
        t.device().ensure_cpu("Tape::leaf")?;
        let (shape, dtype, data) = t.into_parts();
        let data = match &self.dev {
            _ if self.dry => Leaf::Host(Vec::new()),
            Some(d) => {
                let vals: Vec<f32> = data.iter().map(|x| x.to_f64() as f32).collect();
                Leaf::Device(DevBuf::upload(&d.dev, dtype, &vals)?)
            }
            None => Leaf::Host(data),
        };
        Ok(self.push_leaf(shape, dtype, data, requires_grad, SlotKind::Input))
    }

    /// The working copy of parameter `name` as a leaf whose gradient `backward` adds into
    /// `store`'s gradient buffer. Asking twice for the same parameter returns the same `Var`
    /// (tied weights accumulate into one gradient), as long as the store's working copy has
    /// not been touched in between (then a fresh copy is taken).
    ///
    /// The store's working copy must be synced to the tape's compute dtype
    /// ([`ParamStore::sync_working`]); all parameters of one tape must come from one store.
    pub fn param(&mut self, store: &ParamStore<T>, name: &str) -> Result<Var> {
        self.check_recording("param")?;
        let view = store.view(name)?;
        match self.param_len {
            Some(len) if len != store.num_params() => {
                return Err(Error::Params(format!(
                    "parameter `{name}` comes from a store of {} parameters, but this tape \
                     already holds parameters of a store of {len}",
                    store.num_params()
                )));
            }
            _ => self.param_len = Some(store.num_params()),
        }
        let stamp = store.working_stamp();
        if let Some(&(_, s)) = self
            .param_vars
            .get(&view.offset)
            .filter(|(st, _)| *st == stamp)
        {
            return Ok(self.var(s));
        }
        let data = if self.dry {
            Leaf::Host(Vec::new())
        } else if let Some(ctx) = &self.dev {
            Leaf::Device(crate::device::param_leaf(ctx, store, view, self.dtype)?)
        } else {
            if !store.has_data() {
                return Err(Error::Params(
                    "the store is a layout without buffers; only a dry-run tape can use it".into(),
                ));
            }
            if store.working_dtype() != self.dtype {
                return Err(Error::Params(format!(
                    "the working copy is in {} but the tape computes in {}: call \
                     ParamStore::sync_working({}) first",
                    store.working_dtype(),
                    self.dtype,
                    self.dtype.name()
                )));
            }
            let mut buf = self.pool.take(view.numel());
            buf.copy_from_slice(&store.working()[view.range()]);
            Leaf::Host(buf)
        };
        self.param_bytes += view.numel() * self.dtype.size_of();
        let kind = SlotKind::Param {
            offset: view.offset,
        };
        let var = self.push_leaf(view.shape.clone(), self.dtype, data, true, kind);
        self.param_vars.insert(view.offset, (stamp, var.index()));
        if !self.dry
            && let Some(hook) = store.device().and_then(|d| d.gather_hook())
        {
            self.param_refill
                .insert(var.index(), (hook.clone(), view.range()));
        }
        Ok(var)
    }

    /// Whether slot `s` is a parameter leaf whose value can be gathered again.
    pub(crate) fn is_refillable(&self, s: usize) -> bool {
        self.param_refill.contains_key(&s)
    }

    /// Gathers the value of the parameter leaf `s` again (a sharded store's hook).
    fn refill_param(&mut self, s: usize) -> Result<()> {
        let (hook, range) =
            self.param_refill
                .get(&s)
                .cloned()
                .ok_or_else(|| Error::Unavailable {
                    index: s as u32,
                    detail: "an input leaf lost its value".into(),
                })?;
        let ctx = self.dev.as_ref().ok_or_else(|| Error::Unavailable {
            index: s as u32,
            detail: "a sharded parameter on a host tape".into(),
        })?;
        let mut buf = DevBuf::alloc(&ctx.dev, self.slots[s].dtype, range.len())?;
        hook(range.clone(), &mut buf)
            .map_err(|m| Error::Params(format!("gathering parameters {range:?} again: {m}")))?;
        self.set_dvalue(s, buf);
        Ok(())
    }

    // ---- recording -------------------------------------------------------------------------

    /// Records `op` on `inputs` with outputs of `out_shapes` (already validated by the caller),
    /// runs its forward and returns the output handles.
    pub(crate) fn record(
        &mut self,
        op: Op,
        inputs: &[Var],
        out_shapes: Vec<Vec<usize>>,
    ) -> Result<Vec<Var>> {
        self.check_recording(op.name())?;
        let idx = inputs
            .iter()
            .map(|&v| self.slot_index(v))
            .collect::<Result<Vec<_>>>()?;
        let rg = idx.iter().any(|&i| self.slots[i].requires_grad);
        let first_dtype = idx.first().map_or(self.dtype, |&i| self.slots[i].dtype);
        let node = self.nodes.len();
        let first = self.slots.len();
        let n_out = out_shapes.len();
        for (k, shape) in out_shapes.into_iter().enumerate() {
            let dtype = autocast::resolve(autocast::output_store(&op, k), self.dtype, first_dtype);
            self.slots.push(Slot {
                node,
                shape,
                dtype,
                requires_grad: rg && ops::differentiable_output(&op, k),
                kind: SlotKind::Computed,
                value: None,
                grad: None,
                dvalue: None,
                dgrad: None,
                pinned: false,
            });
        }
        self.nodes.push(Node {
            op,
            inputs: idx.clone(),
            first_out: first,
            n_out,
        });
        self.ensure(&idx)?;
        self.fill_node(node)?;
        Ok((first..first + n_out).map(|s| self.var(s)).collect())
    }

    /// Runs the forward of `node` (its inputs must be present) and stores the outputs that are
    /// missing; outputs already present are left as they are (a recomputation yields the same
    /// bits).
    pub(crate) fn fill_node(&mut self, node: usize) -> Result<()> {
        if self.dev.is_some() && !self.dry {
            return self.fill_node_device(node);
        }
        let outs_range = self.nodes[node].outputs();
        let mut outs: Vec<Vec<T>> = outs_range
            .clone()
            .map(|s| {
                if self.dry {
                    Vec::new()
                } else {
                    self.pool.take(numel(&self.slots[s].shape))
                }
            })
            .collect();
        let mut timed = None;
        if !self.dry {
            let start = self.profile.as_ref().map(|_| std::time::Instant::now());
            let n = &self.nodes[node];
            let ins: Vec<Val<T>> = n
                .inputs
                .iter()
                .map(|&i| {
                    let s = &self.slots[i];
                    Val {
                        shape: &s.shape,
                        data: s.value.as_deref().unwrap_or(&[]),
                    }
                })
                .collect();
            debug_assert!(
                ins.iter()
                    .zip(&n.inputs)
                    .all(|(v, &i)| { v.data.len() == numel(&self.slots[i].shape) })
            );
            ops::forward(&n.op, self.dtype, &ins, &mut outs);
            for (k, o) in outs.iter_mut().enumerate() {
                round_par(o, self.slots[outs_range.start + k].dtype);
            }
            timed = start.map(|s| (n.op.name(), s, s.elapsed().as_secs_f64()));
        }
        if let Some((name, start, secs)) = timed {
            self.record_time(name, false, start, secs);
        }
        for (s, o) in outs_range.zip(outs) {
            if self.slots[s].value.is_none() {
                self.set_value(s, o);
            } else {
                self.pool.give(o);
            }
        }
        Ok(())
    }

    /// [`Tape::fill_node`] on the device backend.
    fn fill_node_device(&mut self, node: usize) -> Result<()> {
        let outs_range = self.nodes[node].outputs();
        let start = self.profile.as_ref().map(|_| std::time::Instant::now());
        let ctx = self.dev.as_mut().expect("device tape");
        let n = &self.nodes[node];
        let ins: Vec<DIn> = n
            .inputs
            .iter()
            .map(|&i| DIn {
                shape: &self.slots[i].shape,
                buf: self.slots[i].dvalue.as_ref(),
            })
            .collect();
        let specs: Vec<(&[usize], DType)> = outs_range
            .clone()
            .map(|s| (self.slots[s].shape.as_slice(), self.slots[s].dtype))
            .collect();
        let name = n.op.name();
        let outs = crate::device::ops::forward(ctx, node, &n.op, self.dtype, &ins, &specs)
            .map_err(|e| e.in_op(name))?;
        if let Some(s) = start {
            self.record_time(name, false, s, s.elapsed().as_secs_f64());
        }
        for (s, o) in outs_range.zip(outs) {
            if !self.slots[s].has_value() {
                self.set_dvalue(s, o);
            }
        }
        Ok(())
    }

    /// Makes the values of `slots` present, re-running the forward of whatever was dropped (and,
    /// transitively, of dropped inputs of those). Returns the slots that were filled.
    pub(crate) fn ensure(&mut self, slots: &[usize]) -> Result<Vec<usize>> {
        let mut stack: Vec<usize> = slots
            .iter()
            .copied()
            .filter(|&s| !self.slots[s].has_value())
            .collect();
        if stack.is_empty() {
            return Ok(Vec::new());
        }
        if self.phase == Phase::Backpropagated {
            return Err(Error::Unavailable {
                index: stack[0] as u32,
                detail: "freed by backward".into(),
            });
        }
        let mut nodes = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut filled = Vec::new();
        while let Some(s) = stack.pop() {
            if self.slots[s].has_value() {
                continue;
            }
            if self.is_refillable(s) {
                // A sharded parameter dropped after use: gathered again.
                self.refill_param(s)?;
                filled.push(s);
                continue;
            }
            let slot = &self.slots[s];
            if slot.kind != SlotKind::Computed {
                return Err(Error::Unavailable {
                    index: s as u32,
                    detail: "an input leaf lost its value".into(),
                });
            }
            if seen.insert(slot.node) {
                nodes.push(slot.node);
                for &i in &self.nodes[slot.node].inputs {
                    if !self.slots[i].has_value() {
                        stack.push(i);
                    }
                }
            }
        }
        nodes.sort_unstable();
        for &n in &nodes {
            filled.extend(
                self.nodes[n]
                    .outputs()
                    .filter(|&s| !self.slots[s].has_value()),
            );
            self.fill_node(n)?;
        }
        self.recomputed += nodes.len();
        Ok(filled)
    }
}

/// Rounds a buffer to `dtype` in parallel chunks (no-op for f32).
pub(crate) fn round_par<T: Scalar>(xs: &mut [T], dtype: DType) {
    if dtype.is_low_precision() {
        xs.par_chunks_mut(ops::par::CHUNK)
            .for_each(|c| crate::scalar::round_slice(c, dtype));
    }
}
