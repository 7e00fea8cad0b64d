//! The decoded program: kernels as vectors of [`Inst`] over register slots.
//!
//! Every register value is a `u64` per lane; a 32-bit value lives in the low half (zero-extended),
//! f32 as its bits, f16/bf16 in the low 16 bits, predicates as 0/1.

/// A register slot index (per kernel).
pub(crate) type Slot = u32;

/// A source operand: a register slot or an immediate (already converted to the instruction's
/// type: f32 immediates of an `.f32` instruction are f32 bits).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Src {
    Reg(Slot),
    Imm(u64),
}

/// Integer binary operations (`w` bits wide, signed or not).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum IntOp {
    Add,
    AddSat,
    Sub,
    SubSat,
    MulLo,
    MulHi,
    Min,
    Max,
    Div,
    Rem,
    And,
    Or,
    Xor,
    Shl,
    Shr,
}

/// Integer unary operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum IntUnOp {
    Not,
    Cnot,
    Neg,
    Abs,
    Popc,
    Clz,
    Brev,
}

/// Float types of arithmetic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FTy {
    F32,
    F64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FOp {
    Add,
    Sub,
    Mul,
    Div,
    Min,
    Max,
    /// `min.NaN` / `max.NaN`: a NaN operand gives the canonical NaN.
    MinNan,
    MaxNan,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FUnOp {
    Neg,
    Abs,
    Rcp,
    Sqrt,
    Rsqrt,
    Ex2,
    Lg2,
    Sin,
    Cos,
    Tanh,
}

/// Comparison operators of `setp` (and `set`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Lo,
    Ls,
    Hi,
    Hs,
    Equ,
    Neu,
    Ltu,
    Leu,
    Gtu,
    Geu,
    Num,
    Nan,
}

/// How a `setp` result combines with a third predicate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BoolOp {
    And,
    Or,
    Xor,
}

/// Operand type of a comparison or conversion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ty {
    U(u8),
    S(u8),
    B(u8),
    F16,
    Bf16,
    F32,
    F64,
    Pred,
}

impl Ty {
    pub(crate) fn bits(self) -> u32 {
        match self {
            Ty::U(b) | Ty::S(b) | Ty::B(b) => b as u32,
            Ty::F16 | Ty::Bf16 => 16,
            Ty::F32 => 32,
            Ty::F64 => 64,
            Ty::Pred => 1,
        }
    }
    pub(crate) fn is_float(self) -> bool {
        matches!(self, Ty::F16 | Ty::Bf16 | Ty::F32 | Ty::F64)
    }
}

/// Rounding modes of `cvt` (`.rn .rz .rm .rp`, and their integer forms `.rni` ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rnd {
    Rn,
    Rz,
    Rm,
    Rp,
}

/// `testp` properties.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TestP {
    Finite,
    Infinite,
    Number,
    NotANumber,
    Normal,
    Subnormal,
}

/// State spaces of memory instructions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Space {
    Global,
    Shared,
    Param,
    /// No state space: the address is generic and says where it points.
    Generic,
}

/// An address operand: `base + offset`; a symbol is folded into `offset`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Addr {
    pub(crate) base: Option<Slot>,
    pub(crate) offset: i64,
}

/// `shfl.sync` modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ShflMode {
    Up,
    Down,
    Bfly,
    Idx,
}

/// Special registers, filled per lane when a warp starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Special {
    Tid(u8),
    Ntid(u8),
    Ctaid(u8),
    Nctaid(u8),
    LaneId,
    WarpId,
    NWarpId,
    DynSmem,
    TotalSmem,
    LaneMaskEq,
    LaneMaskLt,
    LaneMaskLe,
    LaneMaskGt,
    LaneMaskGe,
}

/// Where mbarrier arrivals come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MbarOp {
    Init,
    Arrive,
    ArriveExpectTx,
    ExpectTx,
    TryWaitParity,
    TestWaitParity,
    Inval,
}

/// Operations on f16/bf16 values (scalar or packed pairs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HOp {
    Add,
    Sub,
    Mul,
    Min,
    Max,
    Fma,
    Neg,
    Abs,
}

/// `vote.sync` modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum VoteMode {
    All,
    Any,
    Uni,
    Ballot,
}

/// Read-modify-write operations of `atom` / `red`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AtomOp {
    Add,
    Min,
    Max,
    And,
    Or,
    Xor,
    Exch,
    Cas,
    Inc,
    Dec,
}

/// The instruction class for counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Class {
    Int,
    Fp,
    Sfu,
    Convert,
    GlobalMem,
    SharedMem,
    ParamMem,
    Control,
    Sync,
    Tensor,
    AsyncCopy,
}

/// One decoded operation.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Op {
    Int {
        op: IntOp,
        bits: u8,
        signed: bool,
        d: Slot,
        a: Src,
        b: Src,
    },
    IntUn {
        op: IntUnOp,
        bits: u8,
        d: Slot,
        a: Src,
    },
    /// `mul.wide`: `bits` is the source width.
    MulWide {
        signed: bool,
        bits: u8,
        d: Slot,
        a: Src,
        b: Src,
    },
    /// `mad.lo/.hi/.wide` (`wide`: `bits` is the source width).
    Mad {
        hi: bool,
        wide: bool,
        signed: bool,
        bits: u8,
        d: Slot,
        a: Src,
        b: Src,
        c: Src,
    },
    /// Predicate logic (`and/or/xor.pred`).
    PredBin {
        op: BoolOp,
        d: Slot,
        a: Src,
        b: Src,
    },
    F {
        op: FOp,
        ty: FTy,
        ftz: bool,
        sat: bool,
        d: Slot,
        a: Src,
        b: Src,
    },
    Fma {
        ty: FTy,
        ftz: bool,
        sat: bool,
        d: Slot,
        a: Src,
        b: Src,
        c: Src,
    },
    FUn {
        op: FUnOp,
        ty: FTy,
        ftz: bool,
        d: Slot,
        a: Src,
    },
    Setp {
        cmp: Cmp,
        ty: Ty,
        ftz: bool,
        d: Option<Slot>,
        d2: Option<Slot>,
        a: Src,
        b: Src,
        comb: Option<(BoolOp, Src, bool)>,
    },
    Selp {
        d: Slot,
        a: Src,
        b: Src,
        c: Slot,
    },
    Testp {
        p: TestP,
        ty: FTy,
        d: Slot,
        a: Src,
    },
    Mov {
        d: Slot,
        a: Src,
    },
    /// `mov.bN d, {a, b, ..}`: parts from low to high, each `part` bits.
    Pack {
        d: Slot,
        parts: Vec<Src>,
        part: u8,
    },
    /// `mov.bN {a, b, ..}, s`.
    Unpack {
        ds: Vec<Option<Slot>>,
        a: Src,
        part: u8,
    },
    Cvt {
        dty: Ty,
        sty: Ty,
        rnd: Rnd,
        int_rnd: bool,
        sat: bool,
        ftz: bool,
        d: Slot,
        a: Src,
    },
    /// `cvt.rn{.relu}.{bf16x2,f16x2}.f32 d, a, b`: `a` to the upper half.
    CvtPack {
        bf16: bool,
        relu: bool,
        d: Slot,
        a: Src,
        b: Src,
    },
    /// `cvta{.to}.space`: adds or subtracts a window base.
    Cvta {
        to_generic: bool,
        space: Space,
        d: Slot,
        a: Src,
    },
    Ld {
        space: Space,
        /// Bytes per element.
        size: u8,
        /// Sign-extend into wider registers.
        signed: bool,
        ds: Vec<Option<Slot>>,
        addr: Addr,
    },
    St {
        space: Space,
        size: u8,
        vals: Vec<Src>,
        addr: Addr,
    },
    Bra {
        target: u32,
    },
    Exit,
    Trap,
    /// `bar.sync` / `barrier.sync` / `bar.arrive`.
    Bar {
        id: Src,
        count: Option<Src>,
        arrive: bool,
    },
    /// `bar.warp.sync mask`.
    WarpSync {
        mask: Src,
    },
    Shfl {
        mode: ShflMode,
        d: Slot,
        p: Option<Slot>,
        a: Src,
        b: Src,
        c: Src,
        mask: Src,
    },
    CpAsync {
        dst: Addr,
        src: Addr,
        size: u8,
        src_size: Option<Src>,
    },
    CpAsyncCommit,
    CpAsyncWait {
        n: u32,
        all: bool,
    },
    Ldmatrix {
        num: u8,
        trans: bool,
        ds: Vec<Slot>,
        addr: Addr,
    },
    /// `mma.sync.aligned.m16n8k{8,16}.row.col.f32.{f16,bf16}.{..}.f32`.
    Mma {
        k: u8,
        bf16: bool,
        d: [Slot; 4],
        a: Vec<Slot>,
        b: Vec<Slot>,
        c: [Src; 4],
    },
    /// `prmt.b32 d, a, b, c` (default mode): bytes of {b, a} chosen by c's nibbles.
    Prmt {
        d: Slot,
        a: Src,
        b: Src,
        c: Src,
    },
    /// `bfe.{u,s}{32,64} d, a, pos, len`.
    Bfe {
        signed: bool,
        bits: u8,
        d: Slot,
        a: Src,
        b: Src,
        c: Src,
    },
    /// `bfi.b{32,64} f, a, b, pos, len`: `a`'s low bits inserted into `b`.
    Bfi {
        bits: u8,
        d: Slot,
        a: Src,
        b: Src,
        c: Src,
        e: Src,
    },
    /// f16/bf16 arithmetic, each half computed exactly in f64 and rounded once (`.rn`).
    Half {
        op: HOp,
        bf16: bool,
        x2: bool,
        ftz: bool,
        sat: bool,
        d: Slot,
        a: Src,
        b: Src,
        c: Src,
    },
    /// `elect.sync d|p, membermask`: the lowest member lane is elected.
    Elect {
        d: Option<Slot>,
        p: Option<Slot>,
        mask: Src,
    },
    /// `activemask.b32 d`.
    Activemask {
        d: Slot,
    },
    /// `vote.sync.{all,any,uni}.pred` / `vote.sync.ballot.b32`.
    Vote {
        mode: VoteMode,
        d: Slot,
        a: Slot,
        neg: bool,
        mask: Src,
    },
    /// `atom` (with `d`) / `red` (without) on global memory, relaxed.
    Atom {
        op: AtomOp,
        ty: Ty,
        d: Option<Slot>,
        addr: Addr,
        b: Src,
        c: Option<Src>,
    },
    Mbar {
        op: MbarOp,
        /// Destination: the state (arrive) or the predicate (waits).
        d: Option<Slot>,
        addr: Addr,
        /// Count (init, arrive with count), tx bytes (expect_tx) or the parity (waits).
        arg: Option<Src>,
    },
    /// Fences that have no effect in the simulator's memory model.
    Fence,
    /// `fence.proxy.async`: the thread's earlier generic shared-memory stores become visible
    /// to the async proxy (wgmma operand reads, TMA).
    FenceProxyAsync,
    WgmmaFence,
    WgmmaCommit,
    WgmmaWait {
        n: u32,
    },
    /// `wgmma.mma_async.sync.aligned.m64nNk16.f32.{bf16,f16}.{..}`: D (N/2 f32 registers per
    /// thread), A from a shared descriptor or four registers, B from a descriptor.
    Wgmma {
        n: u32,
        bf16: bool,
        d: Vec<Slot>,
        a_desc: Option<Src>,
        a_regs: Option<[Slot; 4]>,
        b_desc: Src,
        scale_d: Src,
        scale_a: i32,
        scale_b: i32,
        trans_a: u32,
        trans_b: u32,
    },
    /// `cp.async.bulk.tensor.Nd.shared::cluster.global.tile.mbarrier::complete_tx::bytes`.
    TmaLoad {
        dst: Addr,
        map: Addr,
        coords: Vec<Src>,
        mbar: Addr,
    },
    Setmaxnreg {
        inc: bool,
        n: u32,
    },
}

/// A decoded instruction with its guard predicate and source position.
#[derive(Clone, Debug)]
pub(crate) struct Inst {
    pub(crate) op: Op,
    /// `@p` (false) / `@!p` (true).
    pub(crate) guard: Option<(Slot, bool)>,
    pub(crate) class: Class,
    /// Instructions that all lanes of the warp must execute together (`.sync.aligned` etc).
    pub(crate) aligned: bool,
    pub(crate) line: u32,
}

/// A kernel parameter's place in the parameter buffer.
#[derive(Clone, Debug)]
pub(crate) struct ParamDecl {
    pub(crate) name: String,
    pub(crate) offset: u32,
    pub(crate) size: u32,
    pub(crate) ty: Ty,
    /// A `.b8 name[N]` array (passed as [`crate::Param::Bytes`]).
    pub(crate) array: bool,
}

/// One decoded `.entry`.
#[derive(Clone, Debug)]
pub(crate) struct Kernel {
    pub(crate) name: String,
    pub(crate) insts: Vec<Inst>,
    /// Instruction text, parallel to `insts`, for errors.
    pub(crate) texts: Vec<String>,
    pub(crate) nslots: u32,
    /// Width in bits of each slot's declared type.
    pub(crate) slot_bits: Vec<u8>,
    pub(crate) specials: Vec<(Slot, Special)>,
    pub(crate) params: Vec<ParamDecl>,
    pub(crate) param_bytes: u32,
    pub(crate) static_shared: u32,
    /// Offset of the `.extern .shared` array (after the static variables).
    pub(crate) dyn_shared_base: u32,
    /// `.reqntid` / `.maxntid` limits.
    pub(crate) reqntid: Option<(u32, u32, u32)>,
    pub(crate) maxntid: Option<(u32, u32, u32)>,
}

/// A decoded module.
#[derive(Debug)]
pub(crate) struct Program {
    pub(crate) kernels: Vec<Kernel>,
}

fn src_slot(s: &Src, out: &mut Vec<Slot>) {
    if let Src::Reg(r) = s {
        out.push(*r);
    }
}

fn addr_slot(a: &Addr, out: &mut Vec<Slot>) {
    if let Some(b) = a.base {
        out.push(b);
    }
}

impl Op {
    /// Every register slot the operation reads or writes (for the wgmma register hazard check).
    pub(crate) fn slots(&self, out: &mut Vec<Slot>) {
        let s = src_slot;
        match self {
            Op::Int { d, a, b, .. }
            | Op::MulWide { d, a, b, .. }
            | Op::PredBin { d, a, b, .. }
            | Op::F { d, a, b, .. }
            | Op::CvtPack { d, a, b, .. } => {
                out.push(*d);
                s(a, out);
                s(b, out);
            }
            Op::Mad { d, a, b, c, .. } | Op::Fma { d, a, b, c, .. } => {
                out.push(*d);
                s(a, out);
                s(b, out);
                s(c, out);
            }
            Op::IntUn { d, a, .. }
            | Op::FUn { d, a, .. }
            | Op::Testp { d, a, .. }
            | Op::Mov { d, a }
            | Op::Cvt { d, a, .. }
            | Op::Cvta { d, a, .. } => {
                out.push(*d);
                s(a, out);
            }
            Op::Setp {
                d, d2, a, b, comb, ..
            } => {
                out.extend(d.iter().chain(d2.iter()));
                s(a, out);
                s(b, out);
                if let Some((_, c, _)) = comb {
                    s(c, out);
                }
            }
            Op::Selp { d, a, b, c } => {
                out.extend([*d, *c]);
                s(a, out);
                s(b, out);
            }
            Op::Pack { d, parts, .. } => {
                out.push(*d);
                parts.iter().for_each(|p| s(p, out));
            }
            Op::Unpack { ds, a, .. } => {
                out.extend(ds.iter().flatten());
                s(a, out);
            }
            Op::Ld { ds, addr, .. } => {
                out.extend(ds.iter().flatten());
                addr_slot(addr, out);
            }
            Op::St { vals, addr, .. } => {
                vals.iter().for_each(|v| s(v, out));
                addr_slot(addr, out);
            }
            Op::Bar { id, count, .. } => {
                s(id, out);
                count.iter().for_each(|c| s(c, out));
            }
            Op::WarpSync { mask } => s(mask, out),
            Op::Shfl {
                d,
                p,
                a,
                b,
                c,
                mask,
                ..
            } => {
                out.push(*d);
                out.extend(p.iter());
                [a, b, c, mask].into_iter().for_each(|x| s(x, out));
            }
            Op::CpAsync {
                dst, src, src_size, ..
            } => {
                addr_slot(dst, out);
                addr_slot(src, out);
                src_size.iter().for_each(|x| s(x, out));
            }
            Op::Ldmatrix { ds, addr, .. } => {
                out.extend(ds.iter());
                addr_slot(addr, out);
            }
            Op::Mma { d, a, b, c, .. } => {
                out.extend(d.iter().chain(a.iter()).chain(b.iter()));
                c.iter().for_each(|x| s(x, out));
            }
            Op::Prmt { d, a, b, c } | Op::Bfe { d, a, b, c, .. } => {
                out.push(*d);
                [a, b, c].into_iter().for_each(|x| s(x, out));
            }
            Op::Bfi { d, a, b, c, e, .. } => {
                out.push(*d);
                [a, b, c, e].into_iter().for_each(|x| s(x, out));
            }
            Op::Half { d, a, b, c, .. } => {
                out.push(*d);
                [a, b, c].into_iter().for_each(|x| s(x, out));
            }
            Op::Elect { d, p, mask } => {
                out.extend(d.iter().chain(p.iter()));
                s(mask, out);
            }
            Op::Activemask { d } => out.push(*d),
            Op::Vote { d, a, mask, .. } => {
                out.extend([*d, *a]);
                s(mask, out);
            }
            Op::Atom { d, addr, b, c, .. } => {
                out.extend(d.iter());
                addr_slot(addr, out);
                s(b, out);
                c.iter().for_each(|x| s(x, out));
            }
            Op::Mbar { d, addr, arg, .. } => {
                out.extend(d.iter());
                addr_slot(addr, out);
                arg.iter().for_each(|x| s(x, out));
            }
            Op::TmaLoad {
                dst,
                map,
                coords,
                mbar,
            } => {
                addr_slot(dst, out);
                addr_slot(map, out);
                addr_slot(mbar, out);
                coords.iter().for_each(|x| s(x, out));
            }
            Op::Wgmma {
                d,
                a_desc,
                a_regs,
                b_desc,
                scale_d,
                ..
            } => {
                out.extend(d.iter());
                a_desc.iter().for_each(|x| s(x, out));
                out.extend(a_regs.iter().flatten());
                s(b_desc, out);
                s(scale_d, out);
            }
            Op::Bra { .. }
            | Op::Exit
            | Op::Trap
            | Op::CpAsyncCommit
            | Op::CpAsyncWait { .. }
            | Op::Fence
            | Op::FenceProxyAsync
            | Op::WgmmaFence
            | Op::WgmmaCommit
            | Op::WgmmaWait { .. }
            | Op::Setmaxnreg { .. } => {}
        }
    }
}
