//! The GEMM PTX template: a hand-written instruction stream filled in by Rust for a tile shape
//! ([`Tile`]), the operands' storage ([`Op`]) and the element types.
//!
//! Kernel `C = act(alpha * op(A) op(B) + beta * C + bias)`, one block per `bm x bn` tile of C:
//!
//! 1. Setup: block tile from `%ctaid.x` (grouped raster, [`super::tile::raster`]); per thread the
//!    global pointers of the chunks it copies, its swizzled shared destinations, and its
//!    `ldmatrix` base addresses ([`super::tile`]). Whether an operand can use the 16-byte copy
//!    (base 16-byte aligned, leading dimension a multiple of 8) is decided once per launch.
//! 2. Main loop over k-tiles (`bk` deep), `stages` shared buffers:
//!    - `stages >= 2`: prologue copies k-tiles `0..stages-1`; iteration `kt` waits for k-tile
//!      `kt` (`cp.async.wait_group stages-2`), `bar.sync`, starts the copy of k-tile
//!      `kt + stages - 1` into the buffer k-tile `kt - 1` used (free: every warp passed the
//!      barrier after computing it), then computes k-tile `kt`. One commit group per k-tile,
//!      empty past the end, so the group count stays in step with `kt`.
//!    - `stages == 1`: `bar.sync`, copy, `cp.async.wait_group 0`, `bar.sync`, compute.
//!    - Copies: `cp.async.cg ... 16, src_bytes` with `src_bytes` = 0..16 zero-filling rows past
//!      the matrix and the K / M / N tail (so any M, N, K work); an operand whose alignment rules
//!      out 16-byte copies takes element loads and `st.shared.v4` instead (same layout).
//!    - Compute: per k16 step, `ldmatrix.x4` (`.trans` for M- or N-contiguous tiles) then
//!      `mt x nt` `mma.sync.m16n8k16` into f32 accumulators.
//! 3. Epilogue ([`super::epilogue`]): alpha, beta * C, bias, GELU, rounding, guarded stores.
//!
//! Control flow is uniform across each warp (every per-thread condition is a predicate on a
//! single instruction), which the PTX simulator in the tests relies on.

use super::Op;
use super::epilogue;
use super::tile::{Ix, Operand, Tile, Which};
use crate::desc::Elem;
use std::fmt::Write;

/// One kernel of the family.
#[derive(Clone, Debug)]
pub struct Spec {
    pub entry: String,
    pub tile: Tile,
    pub op_a: Op,
    pub op_b: Op,
    /// bf16 or f16.
    pub input: Elem,
    /// The input type or f32.
    pub output: Elem,
    /// A strided batch ([`super::batched`]): three more parameters `stride_a`, `stride_b`,
    /// `stride_c` (u64, elements), and block `z = %ctaid.z` works on `X + z * stride_x`.
    pub batched: bool,
}

/// The name of the dynamic shared-memory array every GEMM kernel uses.
pub const SMEM: &str = "lathe_gemm_smem";

/// A PTX body under construction: instructions plus fresh virtual registers, declared at the end.
pub struct Body {
    pub text: String,
    counts: [u32; 5],
    named: Vec<(&'static str, String)>,
    labels: u32,
    /// Inserted after `%` in fresh register names (and after `$L_` in labels), so a body can
    /// be spliced into a kernel that has registers and labels of its own.
    prefix: &'static str,
}

const KINDS: [(&str, &str); 5] = [
    (".b32", "%r"),
    (".b64", "%rd"),
    (".f32", "%f"),
    (".pred", "%p"),
    (".b16", "%h"),
];

impl Body {
    pub(crate) fn new() -> Self {
        Body::with_prefix("")
    }
    /// A body whose fresh registers are `%{prefix}r0`, ... and labels `$L_{prefix}...`.
    pub(crate) fn with_prefix(prefix: &'static str) -> Self {
        Body {
            text: String::new(),
            counts: [0; 5],
            named: Vec::new(),
            labels: 0,
            prefix,
        }
    }
    fn stem(&self, kind: usize) -> String {
        format!("%{}{}", self.prefix, &KINDS[kind].1[1..])
    }
    fn fresh(&mut self, kind: usize) -> String {
        self.counts[kind] += 1;
        format!("{}{}", self.stem(kind), self.counts[kind] - 1)
    }
    pub fn r(&mut self) -> String {
        self.fresh(0)
    }
    pub fn rd(&mut self) -> String {
        self.fresh(1)
    }
    pub fn f(&mut self) -> String {
        self.fresh(2)
    }
    pub fn p(&mut self) -> String {
        self.fresh(3)
    }
    pub fn h(&mut self) -> String {
        self.fresh(4)
    }
    /// A named register (declared once).
    pub fn named(&mut self, ty: &'static str, name: &str) -> String {
        let n = format!("%{name}");
        if !self.named.iter().any(|(_, m)| *m == n) {
            self.named.push((ty, n.clone()));
        }
        n
    }
    /// A fresh label with a readable stem.
    pub fn label(&mut self, stem: &str) -> String {
        self.labels += 1;
        format!("$L_{}{stem}_{}", self.prefix, self.labels)
    }
    /// One instruction line.
    pub fn i(&mut self, s: impl AsRef<str>) {
        let _ = writeln!(self.text, "\t{}", s.as_ref());
    }
    /// A comment line.
    pub fn c(&mut self, s: impl AsRef<str>) {
        let _ = writeln!(self.text, "\t// {}", s.as_ref());
    }
    pub fn put_label(&mut self, l: &str) {
        let _ = writeln!(self.text, "{l}:");
    }
    /// Prints `ix` (a function of the register `tid`) into a fresh register and returns it.
    /// Callers may update the result in place: it is never `tid` itself.
    pub fn ix(&mut self, ix: &Ix, tid: &str) -> String {
        let mut text = String::new();
        let mut next = self.counts[0];
        let stem = self.stem(0);
        let v = ix.emit(&mut text, tid, &mut || {
            next += 1;
            format!("{stem}{}", next - 1)
        });
        self.counts[0] = next;
        self.text.push_str(&text);
        if v.starts_with('%') && v != tid {
            v
        } else {
            let r = self.r();
            self.i(format!("mov.u32 {r}, {v};"));
            r
        }
    }
    pub(crate) fn declarations(&self) -> String {
        let mut s = String::new();
        for (k, (ty, _)) in KINDS.iter().enumerate() {
            if self.counts[k] > 0 {
                let _ = writeln!(s, "\t.reg {ty} {}<{}>;", self.stem(k), self.counts[k]);
            }
        }
        for (ty, n) in &self.named {
            let _ = writeln!(s, "\t.reg {ty} {n};");
        }
        s
    }
}

/// The PTX text of one f32 immediate.
pub fn f32_imm(v: f32) -> String {
    format!("0f{:08X}", v.to_bits())
}

fn mma_type(e: Elem) -> &'static str {
    match e {
        Elem::BF16 => "bf16",
        Elem::F16 => "f16",
        _ => unreachable!("GEMM inputs are bf16 or f16"),
    }
}

/// Per-operand registers of the loader.
struct Loader {
    o: Operand,
    base: String,
    s_rows: String,
    s_cols: String,
    fast: String,
    dst: String,
    gcol: String,
    rows: Vec<String>,
    ptrs: Vec<String>,
    /// Bytes to advance a pointer per k-tile when K runs down the rows.
    step: Option<String>,
}

/// The registers the epilogue reads.
pub struct Regs {
    pub tid: String,
    pub m: String,
    pub n: String,
    pub ldc: String,
    pub c: String,
    pub bias: String,
    pub alpha: String,
    pub beta: String,
    pub flags: String,
    pub bm0: String,
    pub bn0: String,
    /// `acc[(i * nt + j) * 4 + q]`: fragment (i, j), register q.
    pub acc: Vec<String>,
}

/// Writes one kernel.
///
/// # Panics
/// When `spec.tile` fails [`Tile::validate`] (the tiles are compile-time constants).
pub fn kernel(spec: &Spec) -> String {
    let t = &spec.tile;
    if let Err(e) = t.validate() {
        panic!("invalid GEMM tile: {e}");
    }
    let mut b = Body::new();
    let mut params = vec![
        ("a", ".u64"),
        ("b", ".u64"),
        ("c", ".u64"),
        ("bias", ".u64"),
        ("m", ".u32"),
        ("n", ".u32"),
        ("k", ".u32"),
        ("lda", ".u32"),
        ("ldb", ".u32"),
        ("ldc", ".u32"),
        ("alpha", ".f32"),
        ("beta", ".f32"),
        ("flags", ".u32"),
    ];
    if spec.batched {
        params.extend([
            ("stride_a", ".u64"),
            ("stride_b", ".u64"),
            ("stride_c", ".u64"),
        ]);
    }

    // ---- parameters
    let reg = |b: &mut Body, name: &str, ty: &str| -> String {
        let (rty, ld) = match ty {
            ".u64" => (".b64", "ld.param.u64"),
            ".f32" => (".f32", "ld.param.f32"),
            _ => (".b32", "ld.param.u32"),
        };
        let r = b.named(rty, name);
        b.i(format!("{ld} {r}, [p_{name}];"));
        if ty == ".u64" {
            b.i(format!("cvta.to.global.u64 {r}, {r};"));
        }
        r
    };
    b.c("parameters");
    let pa = reg(&mut b, "a", ".u64");
    let pb = reg(&mut b, "b", ".u64");
    let pc = reg(&mut b, "c", ".u64");
    let pbias = reg(&mut b, "bias", ".u64");
    let m = reg(&mut b, "m", ".u32");
    let n = reg(&mut b, "n", ".u32");
    let k = reg(&mut b, "k", ".u32");
    let lda = reg(&mut b, "lda", ".u32");
    let ldb = reg(&mut b, "ldb", ".u32");
    let ldc = reg(&mut b, "ldc", ".u32");
    let alpha = reg(&mut b, "alpha", ".f32");
    let beta = reg(&mut b, "beta", ".f32");
    let flags = reg(&mut b, "flags", ".u32");
    if spec.batched {
        b.c("strided batch: A, B, C of problem z = ctaid.z start z * stride elements further");
        let z = b.rd();
        let zr = b.r();
        b.i(format!("mov.u32 {zr}, %ctaid.z;"));
        b.i(format!("cvt.u64.u32 {z}, {zr};"));
        for (name, base, size) in [
            ("stride_a", &pa, spec.input.size()),
            ("stride_b", &pb, spec.input.size()),
            ("stride_c", &pc, spec.output.size()),
        ] {
            let st = b.rd();
            b.i(format!("ld.param.u64 {st}, [p_{name}];"));
            b.i(format!("mul.lo.u64 {st}, {st}, {z};"));
            b.i(format!("shl.b64 {st}, {st}, {};", size.trailing_zeros()));
            b.i(format!("add.u64 {base}, {base}, {st};"));
        }
    }
    let tid = b.named(".b32", "thr");
    b.i(format!("mov.u32 {tid}, %tid.x;"));
    let sbase = b.named(".b32", "sbase");
    b.i(format!("mov.u32 {sbase}, {SMEM};"));

    // ---- block tile (grouped raster; see tile::raster)
    b.c("block tile: grouped raster over (ceil(m/bm), ceil(n/bn)) tiles");
    let tiles_m = b.r();
    b.i(format!("add.u32 {tiles_m}, {m}, {};", t.bm - 1));
    b.i(format!(
        "shr.u32 {tiles_m}, {tiles_m}, {};",
        t.bm.trailing_zeros()
    ));
    let tiles_n = b.r();
    b.i(format!("add.u32 {tiles_n}, {n}, {};", t.bn - 1));
    b.i(format!(
        "shr.u32 {tiles_n}, {tiles_n}, {};",
        t.bn.trailing_zeros()
    ));
    let gsize = b.r();
    b.i(format!("mul.lo.u32 {gsize}, {tiles_n}, {};", t.group_m));
    let pid = b.r();
    b.i(format!("mov.u32 {pid}, %ctaid.x;"));
    let group = b.r();
    b.i(format!("div.u32 {group}, {pid}, {gsize};"));
    let first_m = b.r();
    b.i(format!("mul.lo.u32 {first_m}, {group}, {};", t.group_m));
    let grows = b.r();
    b.i(format!("sub.u32 {grows}, {tiles_m}, {first_m};"));
    b.i(format!("min.u32 {grows}, {grows}, {};", t.group_m));
    let rem = b.r();
    b.i(format!("mul.lo.u32 {rem}, {group}, {gsize};"));
    b.i(format!("sub.u32 {rem}, {pid}, {rem};"));
    let tile_m = b.r();
    b.i(format!("rem.u32 {tile_m}, {rem}, {grows};"));
    b.i(format!("add.u32 {tile_m}, {tile_m}, {first_m};"));
    let tile_n = b.r();
    b.i(format!("div.u32 {tile_n}, {rem}, {grows};"));
    let bm0 = b.named(".b32", "bm0");
    b.i(format!(
        "shl.b32 {bm0}, {tile_m}, {};",
        t.bm.trailing_zeros()
    ));
    let bn0 = b.named(".b32", "bn0");
    b.i(format!(
        "shl.b32 {bn0}, {tile_n}, {};",
        t.bn.trailing_zeros()
    ));
    let ktiles = b.named(".b32", "ktiles");
    b.i(format!("add.u32 {ktiles}, {k}, {};", t.bk - 1));
    b.i(format!(
        "shr.u32 {ktiles}, {ktiles}, {};",
        t.bk.trailing_zeros()
    ));

    // ---- loaders
    let oa = Operand::a(t, spec.op_a);
    let ob = Operand::b(t, spec.op_b);
    let la = loader_setup(&mut b, t, oa, &pa, &lda, [&m, &n, &k], &bm0, &bn0, &tid);
    let lb = loader_setup(&mut b, t, ob, &pb, &ldb, [&m, &n, &k], &bm0, &bn0, &tid);

    // ---- ldmatrix bases: one register per XOR key
    b.c("ldmatrix lane offsets, one per XOR key (tile::Operand::ldm_base)");
    let keys_a: Vec<(u32, String)> = oa
        .ldm_keys(t)
        .into_iter()
        .map(|key| (key, b.ix(&oa.ldm_base(t, key), &tid)))
        .collect();
    let keys_b: Vec<(u32, String)> = ob
        .ldm_keys(t)
        .into_iter()
        .map(|key| (key, b.ix(&ob.ldm_base(t, key), &tid)))
        .collect();

    // ---- accumulators
    let acc: Vec<String> = (0..t.mt() * t.nt() * 4).map(|_| b.f()).collect();
    b.c("accumulators: f32, zero");
    for r in &acc {
        b.i(format!("mov.f32 {r}, 0f00000000;"));
    }

    // ---- pipeline
    let ld_slot = b.named(".b32", "ld_slot");
    let cmp_slot = b.named(".b32", "cmp_slot");
    let ld_tile = b.named(".b32", "ld_tile");
    let kt = b.named(".b32", "kt");
    b.i(format!("mov.u32 {ld_slot}, 0;"));
    b.i(format!("mov.u32 {cmp_slot}, 0;"));
    b.i(format!("mov.u32 {ld_tile}, 0;"));
    b.i(format!("mov.u32 {kt}, 0;"));
    let loaders = [la, lb];
    if t.stages >= 2 {
        b.c(format!(
            "prologue: k-tiles 0..={} into stages 0..={}",
            t.stages - 2,
            t.stages - 2
        ));
        let top = b.label("prologue");
        let end = b.label("prologue_end");
        b.put_label(&top);
        let p = b.p();
        b.i(format!("setp.ge.u32 {p}, {ld_tile}, {};", t.stages - 1));
        b.i(format!("@{p} bra.uni {end};"));
        load_step(&mut b, t, &loaders, &sbase, &ld_slot, &ld_tile, &ktiles);
        b.i(format!("bra.uni {top};"));
        b.put_label(&end);
    }
    b.c("main loop over k-tiles");
    let top = b.label("main");
    let end = b.label("main_end");
    b.put_label(&top);
    let p = b.p();
    b.i(format!("setp.ge.u32 {p}, {kt}, {ktiles};"));
    b.i(format!("@{p} bra.uni {end};"));
    if t.stages >= 2 {
        b.c("k-tile kt has landed (one group per k-tile); every warp is done with kt-1");
        b.i(format!("cp.async.wait_group {};", t.stages - 2));
        b.i("bar.sync 0;");
        load_step(&mut b, t, &loaders, &sbase, &ld_slot, &ld_tile, &ktiles);
    } else {
        b.c("one stage: every warp is done with the buffer, refill it, wait, compute");
        b.i("bar.sync 0;");
        load_step(&mut b, t, &loaders, &sbase, &ld_slot, &ld_tile, &ktiles);
        b.i("cp.async.wait_group 0;");
        b.i("bar.sync 0;");
    }
    compute(
        &mut b, spec, &oa, &ob, &keys_a, &keys_b, &sbase, &cmp_slot, &acc,
    );
    b.i(format!("add.u32 {kt}, {kt}, 1;"));
    b.i(format!("bra.uni {top};"));
    b.put_label(&end);
    b.i("cp.async.wait_all;");

    // ---- epilogue
    let regs = Regs {
        tid: tid.clone(),
        m,
        n,
        ldc,
        c: pc,
        bias: pbias,
        alpha,
        beta,
        flags,
        bm0,
        bn0,
        acc,
    };
    epilogue::emit(&mut b, spec, &regs);
    b.i("ret;");

    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n// {}: C = act(alpha * op(A) op(B) + beta * C + bias)",
        spec.entry
    );
    let _ = writeln!(
        s,
        "// A {:?}, B {:?}, {} inputs, {} output; tile {}x{}x{}, {}x{} warps, {} stage(s)",
        spec.op_a,
        spec.op_b,
        spec.input.name(),
        spec.output.name(),
        t.bm,
        t.bn,
        t.bk,
        t.warps_m,
        t.warps_n,
        t.stages
    );
    let (a_shape, b_shape) = (
        match spec.op_a {
            Op::N => "(m, k)",
            Op::T => "(k, m)",
        },
        match spec.op_b {
            Op::N => "(k, n)",
            Op::T => "(n, k)",
        },
    );
    let (i, o) = (spec.input.name(), spec.output.name());
    let _ = writeln!(
        s,
        "// p_a    {a_shape} {i}, row-major, leading dimension p_lda"
    );
    let _ = writeln!(
        s,
        "// p_b    {b_shape} {i}, row-major, leading dimension p_ldb"
    );
    let _ = writeln!(
        s,
        "// p_c    (m, n) {o}, row-major, leading dimension p_ldc; read iff beta != 0"
    );
    let _ = writeln!(
        s,
        "// p_bias (n) {i}, read iff p_flags & {}",
        super::FLAG_BIAS
    );
    let _ = writeln!(
        s,
        "// p_flags: {} bias, {} GELU (tanh form)",
        super::FLAG_BIAS,
        super::FLAG_GELU
    );
    if spec.batched {
        let _ = writeln!(
            s,
            "// p_stride_a, p_stride_b, p_stride_c: elements between the problems of the batch \
             (problem %ctaid.z)"
        );
    }
    let _ = writeln!(s, ".visible .entry {}(", spec.entry);
    let list: Vec<String> = params
        .iter()
        .map(|(name, ty)| format!("\t.param {ty} p_{name}"))
        .collect();
    let _ = writeln!(s, "{}\n)", list.join(",\n"));
    let _ = writeln!(s, ".maxntid {}, 1, 1", t.threads());
    if t.min_blocks > 0 {
        let _ = writeln!(s, ".minnctapersm {}", t.min_blocks);
    }
    let _ = writeln!(s, "{{");
    s.push_str(&b.declarations());
    s.push_str(&b.text);
    s.push_str("}\n");
    s
}

/// Registers and pointers of one operand's loader (see the module docs, step 1).
#[allow(clippy::too_many_arguments)]
fn loader_setup(
    b: &mut Body,
    t: &Tile,
    o: Operand,
    base: &str,
    ld: &str,
    [m, n, k]: [&String; 3],
    bm0: &str,
    bn0: &str,
    tid: &str,
) -> Loader {
    let x = match o.which {
        Which::A => "a",
        Which::B => "b",
    };
    // Stored matrix: (s_rows, s_cols); the tile's origin on the non-K axis.
    let (s_rows, s_cols, origin) = match (o.which, o.op) {
        (Which::A, Op::N) => (m, k, bm0),
        (Which::A, Op::T) => (k, m, bm0),
        (Which::B, Op::N) => (k, n, bn0),
        (Which::B, Op::T) => (n, k, bn0),
    };
    b.c(format!(
        "{x} loader: stored ({s_rows}, {s_cols}) row-major, ld {ld}; tile {} rows x {} chunks",
        o.rows, o.chunks
    ));
    let fast = b.named(".pred", &format!("{x}_fast"));
    let lo = b.r();
    b.i(format!("cvt.u32.u64 {lo}, {base};"));
    b.i(format!("and.b32 {lo}, {lo}, 15;"));
    let l7 = b.r();
    b.i(format!("and.b32 {l7}, {ld}, 7;"));
    b.i(format!("or.b32 {lo}, {lo}, {l7};"));
    b.i(format!("setp.eq.u32 {fast}, {lo}, 0;"));

    let dst = b.ix(&o.load_dst(), tid);
    let chunk = b.ix(&o.load_chunk(), tid);
    let row0 = b.ix(&o.load_row(), tid);
    // gcol: first stored column of the thread's chunk; rows: its stored rows.
    let gcol = b.named(".b32", &format!("{x}_gcol"));
    b.i(format!("shl.b32 {gcol}, {chunk}, 3;"));
    if !o.k_on_rows {
        // Columns are K (start at 0), rows start at the tile origin.
        b.i(format!("add.u32 {row0}, {row0}, {origin};"));
    } else {
        // Rows are K (start at 0), columns start at the tile origin.
        b.i(format!("add.u32 {gcol}, {gcol}, {origin};"));
    }
    let mut rows = Vec::new();
    let mut ptrs = Vec::new();
    let g64 = b.rd();
    b.i(format!("cvt.u64.u32 {g64}, {gcol};"));
    for u in 0..o.chunks_per_thread(t) {
        let r = b.named(".b32", &format!("{x}_row{u}"));
        b.i(format!("add.u32 {r}, {row0}, {};", u * o.row_step(t)));
        let p = b.named(".b64", &format!("{x}_ptr{u}"));
        b.i(format!("mul.wide.u32 {p}, {r}, {ld};"));
        b.i(format!("add.u64 {p}, {p}, {g64};"));
        b.i(format!("shl.b64 {p}, {p}, 1;"));
        b.i(format!("add.u64 {p}, {p}, {base};"));
        rows.push(r);
        ptrs.push(p);
    }
    let step = if o.k_on_rows {
        let s = b.named(".b64", &format!("{x}_step"));
        b.i(format!("mul.wide.u32 {s}, {ld}, {};", 2 * t.bk));
        Some(s)
    } else {
        None
    };
    Loader {
        o,
        base: base.to_string(),
        s_rows: s_rows.clone(),
        s_cols: s_cols.clone(),
        fast,
        dst,
        gcol,
        rows,
        ptrs,
        step,
    }
}

/// Copies k-tile `ld_tile` (if it exists) into the stage at `ld_slot`, commits one group, and
/// moves `ld_tile` / `ld_slot` on.
fn load_step(
    b: &mut Body,
    t: &Tile,
    loaders: &[Loader; 2],
    sbase: &str,
    ld_slot: &str,
    ld_tile: &str,
    ktiles: &str,
) {
    let skip = b.label("no_tile");
    let p = b.p();
    b.i(format!("setp.ge.u32 {p}, {ld_tile}, {ktiles};"));
    b.i(format!("@{p} bra.uni {skip};"));
    for l in loaders {
        load_tile(b, t, l, sbase, ld_slot);
    }
    b.put_label(&skip);
    b.i("cp.async.commit_group;");
    b.i(format!("add.u32 {ld_tile}, {ld_tile}, 1;"));
    b.i(format!(
        "add.u32 {ld_slot}, {ld_slot}, {};",
        t.stage_bytes()
    ));
    let w = b.p();
    b.i(format!("setp.eq.u32 {w}, {ld_slot}, {};", t.shared_bytes()));
    b.i(format!("selp.b32 {ld_slot}, 0, {ld_slot}, {w};"));
}

/// One operand's chunks of the current k-tile, then the pointer advance.
fn load_tile(b: &mut Body, t: &Tile, l: &Loader, sbase: &str, ld_slot: &str) {
    let o = &l.o;
    // Valid elements of the thread's chunk along the columns: clamp(s_cols - gcol, 0, 8).
    let nv = b.r();
    b.i(format!("sub.s32 {nv}, {}, {};", l.s_cols, l.gcol));
    b.i(format!("min.s32 {nv}, {nv}, 8;"));
    b.i(format!("max.s32 {nv}, {nv}, 0;"));
    let dsta = b.r();
    b.i(format!("add.u32 {dsta}, {sbase}, {ld_slot};"));
    b.i(format!("add.u32 {dsta}, {dsta}, {};", l.dst));
    let slow = b.label("slow_copy");
    let done = b.label("copied");
    b.i(format!("@!{} bra.uni {slow};", l.fast));
    let nb = b.r();
    b.i(format!("shl.b32 {nb}, {nv}, 1;"));
    for u in 0..l.rows.len() {
        let off = o.offset + u as u32 * t.threads() * 16;
        let pv = b.p();
        b.i(format!("setp.lt.u32 {pv}, {}, {};", l.rows[u], l.s_rows));
        let nbu = b.r();
        b.i(format!("selp.b32 {nbu}, {nb}, 0, {pv};"));
        // A copy of 0 bytes reads nothing; point it at the matrix base anyway.
        let pz = b.p();
        b.i(format!("setp.ne.u32 {pz}, {nbu}, 0;"));
        let src = b.rd();
        b.i(format!("selp.b64 {src}, {}, {}, {pz};", l.ptrs[u], l.base));
        b.i(format!(
            "cp.async.cg.shared.global [{dsta}+{off}], [{src}], 16, {nbu};"
        ));
    }
    b.i(format!("bra.uni {done};"));
    b.put_label(&slow);
    for u in 0..l.rows.len() {
        let off = o.offset + u as u32 * t.threads() * 16;
        let pv = b.p();
        b.i(format!("setp.lt.u32 {pv}, {}, {};", l.rows[u], l.s_rows));
        let hs: Vec<String> = (0..8).map(|_| b.h()).collect();
        for (e, h) in hs.iter().enumerate() {
            let pe = b.p();
            b.i(format!("setp.gt.and.s32 {pe}, {nv}, {e}, {pv};"));
            b.i(format!("mov.b16 {h}, 0;"));
            b.i(format!(
                "@{pe} ld.global.b16 {h}, [{}+{}];",
                l.ptrs[u],
                2 * e
            ));
        }
        let ws: Vec<String> = (0..4).map(|_| b.r()).collect();
        for (q, w) in ws.iter().enumerate() {
            b.i(format!(
                "mov.b32 {w}, {{{}, {}}};",
                hs[2 * q],
                hs[2 * q + 1]
            ));
        }
        b.i(format!(
            "st.shared.v4.b32 [{dsta}+{off}], {{{}, {}, {}, {}}};",
            ws[0], ws[1], ws[2], ws[3]
        ));
    }
    b.put_label(&done);
    match &l.step {
        Some(step) => {
            for (r, p) in l.rows.iter().zip(&l.ptrs) {
                b.i(format!("add.u32 {r}, {r}, {};", t.bk));
                b.i(format!("add.u64 {p}, {p}, {step};"));
            }
        }
        None => {
            b.i(format!("add.u32 {}, {}, {};", l.gcol, l.gcol, t.bk));
            for p in &l.ptrs {
                b.i(format!("add.u64 {p}, {p}, {};", 2 * t.bk));
            }
        }
    }
}

/// `ldmatrix` + `mma.sync` over the k-tile in the stage at `cmp_slot`.
#[allow(clippy::too_many_arguments)]
fn compute(
    b: &mut Body,
    spec: &Spec,
    oa: &Operand,
    ob: &Operand,
    keys_a: &[(u32, String)],
    keys_b: &[(u32, String)],
    sbase: &str,
    cmp_slot: &str,
    acc: &[String],
) {
    let t = &spec.tile;
    b.c("compute the k-tile in the stage at cmp_slot");
    let stage = b.r();
    b.i(format!("add.u32 {stage}, {sbase}, {cmp_slot};"));
    let ptr_a: Vec<(u32, String)> = keys_a
        .iter()
        .map(|(key, off)| {
            let r = b.r();
            b.i(format!("add.u32 {r}, {stage}, {off};"));
            (*key, r)
        })
        .collect();
    let ptr_b: Vec<(u32, String)> = keys_b
        .iter()
        .map(|(key, off)| {
            let r = b.r();
            b.i(format!("add.u32 {r}, {stage}, {off};"));
            (*key, r)
        })
        .collect();
    let find = |v: &[(u32, String)], key: u32| -> String {
        v.iter()
            .find(|(k, _)| *k == key)
            .map(|(_, r)| r.clone())
            .expect("key register")
    };
    let ty = mma_type(spec.input);
    for ks in 0..t.ksteps() {
        // fa[i][q]: A fragment i, register q; fb[j][q]: B fragment j, register q.
        let mut fa: Vec<Vec<String>> = Vec::new();
        for l in oa.ldms(t).iter().filter(|l| l.ks == ks) {
            let regs: Vec<String> = (0..4).map(|_| b.r()).collect();
            let trans = if oa.trans { ".trans" } else { "" };
            b.i(format!(
                "ldmatrix.sync.aligned.m8n8.x4{trans}.shared.b16 {{{}}}, [{}+{}];",
                regs.join(", "),
                find(&ptr_a, l.key),
                oa.offset + l.imm
            ));
            fa.push(regs);
        }
        let mut fb: Vec<Vec<String>> = Vec::new();
        for l in ob.ldms(t).iter().filter(|l| l.ks == ks) {
            let regs: Vec<String> = (0..4).map(|_| b.r()).collect();
            let trans = if ob.trans { ".trans" } else { "" };
            b.i(format!(
                "ldmatrix.sync.aligned.m8n8.x4{trans}.shared.b16 {{{}}}, [{}+{}];",
                regs.join(", "),
                find(&ptr_b, l.key),
                ob.offset + l.imm
            ));
            fb.push(vec![regs[0].clone(), regs[1].clone()]);
            fb.push(vec![regs[2].clone(), regs[3].clone()]);
        }
        for (i, a) in fa.iter().enumerate() {
            for (j, bb) in fb.iter().enumerate() {
                let base = (i * t.nt() as usize + j) * 4;
                let d = acc[base..base + 4].join(", ");
                b.i(format!(
                    "mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32 {{{d}}}, {{{}}}, {{{}}}, {{{d}}};",
                    a.join(", "),
                    bb.join(", ")
                ));
            }
        }
    }
    b.i(format!(
        "add.u32 {cmp_slot}, {cmp_slot}, {};",
        t.stage_bytes()
    ));
    let w = b.p();
    b.i(format!(
        "setp.eq.u32 {w}, {cmp_slot}, {};",
        t.shared_bytes()
    ));
    b.i(format!("selp.b32 {cmp_slot}, 0, {cmp_slot}, {w};"));
}

/// A whole module: the header, the shared array, and the kernels.
pub fn module(specs: &[Spec]) -> String {
    let mut s = crate::ptx::header(crate::desc::Target::Sm80);
    let _ = writeln!(s, "\n.extern .shared .align 128 .b8 {SMEM}[];");
    for spec in specs {
        s.push_str(&kernel(spec));
    }
    s
}
