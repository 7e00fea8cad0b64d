//! The PTX templates of the fused causal attention ([`super::flash`]): forward, the backward's
//! row dot `D = rowsum(dO * O)`, the dQ pass and the dK/dV pass.
//!
//! Shared shape of the three tiled kernels: 128 threads = 4 warps, a block owns 64 rows (queries
//! for the forward and dQ, keys for dK/dV), each warp 16 of them. Tiles of 64 tokens x `D`
//! (the head size rounded up to 32 or 64) are copied into shared memory with `cp.async` (16
//! bytes a copy, zero-filled past the sequence and past the head), each row's 16-byte chunks
//! XOR-swizzled so that `ldmatrix` reads 8 rows of one chunk column from 8 different bank
//! groups. Products are `mma.sync.m16n8k16` with f32 accumulators; probabilities and score
//! gradients are rounded to the input type to be the A operand of the next product straight
//! from the accumulator registers (the C fragment of `m16n8` is the A fragment of `k16`).
//!
//! Fragment layouts (`g = lane / 4`, `q = lane % 4`): A (16 x 16): `a0 = (g, 2q..)`,
//! `a1 = (g+8, 2q..)`, `a2 = (g, 2q+8..)`, `a3 = (g+8, 2q+8..)`; B (16 x 8): `b0 = (2q.., g)`,
//! `b1 = (2q+8.., g)`; C (16 x 8, f32): `c0, c1 = (g, 2q), (g, 2q+1)`, `c2, c3` the same at
//! row `g + 8`.
//!
//! `ldmatrix.x4` lane addresses come in two patterns over a 16 x 16 block at (row0, chunk0):
//! - P1: lane `l` addresses row `l % 8 + 8 * ((l / 8) % 2)`, chunk `l / 16`: the four A
//!   registers (non-transposed), or with `.trans` the B registers of two n-tiles from a
//!   K-major tile (rows are k).
//! - P2: row `l % 8 + 8 * (l / 16)`, chunk `(l / 8) % 2`: the B registers of two n-tiles
//!   from an N-major tile (rows are n, non-transposed).
//!
//! Control flow is uniform per warp (loop bounds and the diagonal test depend on the block
//! only); per-lane conditions are predicates on single instructions.

use crate::desc::Elem;
use crate::gemm::ptx::{Body, f32_imm};
use std::fmt::Write;

/// Rows of a block tile (queries or keys) and tokens of the tiles it loops over.
pub(crate) const BR: u32 = 64;
/// Threads per block of the tiled kernels.
pub(crate) const THREADS: u32 = 128;
/// Rows (warps) per block of the row-dot kernel.
pub(crate) const DOT_ROWS: u32 = 8;

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2: f32 = std::f32::consts::LN_2;

/// Which kernel of the family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Fwd,
    Dq,
    Dkdv,
}

fn ty(dt: Elem) -> &'static str {
    match dt {
        Elem::BF16 => "bf16",
        Elem::F16 => "f16",
        _ => unreachable!("fused attention runs on bf16 or f16"),
    }
}

/// Bytes of one 64 x `d` tile.
pub(crate) fn tile_bytes(d: usize) -> usize {
    BR as usize * d * 2
}

/// Static shared memory of a kernel in bytes.
pub(crate) fn shared_bytes(kind: Kind, d: usize) -> usize {
    match kind {
        Kind::Fwd => 3 * tile_bytes(d),
        Kind::Dq => 4 * tile_bytes(d),
        Kind::Dkdv => 4 * tile_bytes(d) + 2 * 4 * BR as usize,
    }
}

/// A kernel under construction: the register allocator plus the per-thread constants.
struct Gen {
    b: Body,
    dt: Elem,
    d: usize,
    /// 16-byte chunks per tile row (`d / 8`).
    w: usize,
    sbase: String,
    warp: String,
    g: String,
    q: String,
    /// P1 / P2 `ldmatrix` lane offsets (shared addresses), one per even chunk.
    off1: Vec<String>,
    off2: Vec<String>,
    /// Loader: this thread's chunk, first row, and shared destination (swizzled).
    ld_chunk: String,
    ld_row: String,
    ld_dst: String,
}

impl Gen {
    fn i(&mut self, s: impl AsRef<str>) {
        self.b.i(s);
    }

    /// `f(row)`: the XOR key of a row (the swizzle), from its low bits.
    fn swizzle_key(&mut self, row: &str) -> String {
        let k = self.b.r();
        if self.w >= 8 {
            self.i(format!("and.b32 {k}, {row}, 7;"));
        } else {
            // 4 chunks per row: two rows share a 128-byte line; key (row / 2) % 4.
            self.i(format!("shr.u32 {k}, {row}, 1;"));
            self.i(format!("and.b32 {k}, {k}, 3;"));
        }
        k
    }

    /// Shared address of (row register, chunk register) in a tile at byte 0 (add the tile
    /// offset as an immediate).
    fn smem_addr(&mut self, row: &str, chunk: &str) -> String {
        let key = self.swizzle_key(row);
        let a = self.b.r();
        self.i(format!("xor.b32 {a}, {chunk}, {key};"));
        self.i(format!("shl.b32 {a}, {a}, 4;"));
        let rb = self.b.r();
        self.i(format!("mul.lo.u32 {rb}, {row}, {};", self.w * 16));
        self.i(format!("add.u32 {a}, {a}, {rb};"));
        self.i(format!("add.u32 {a}, {a}, {};", self.sbase));
        a
    }

    /// `ldmatrix.x4` at `addr + imm`; returns the four registers.
    fn ldsm(&mut self, trans: bool, addr: &str, imm: usize) -> [String; 4] {
        let r = [self.b.r(), self.b.r(), self.b.r(), self.b.r()];
        let t = if trans { ".trans" } else { "" };
        self.i(format!(
            "ldmatrix.sync.aligned.m8n8.x4{t}.shared.b16 {{{}, {}, {}, {}}}, [{addr}+{imm}];",
            r[0], r[1], r[2], r[3]
        ));
        r
    }

    fn mma(&mut self, acc: &[String], a: &[String], b0: &str, b1: &str) {
        let t = ty(self.dt);
        let d = acc.join(", ");
        self.i(format!(
            "mma.sync.aligned.m16n8k16.row.col.f32.{t}.{t}.f32 {{{d}}}, {{{}}}, {{{b0}, {b1}}}, {{{d}}};",
            a.join(", ")
        ));
    }

    fn zeros(&mut self, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| {
                let f = self.b.f();
                self.i(format!("mov.f32 {f}, 0f00000000;"));
                f
            })
            .collect()
    }

    /// The A fragments of this warp's 16 rows of a tile at `tile_off`: `d / 16` k-steps of 4
    /// registers.
    fn warp_a_frags(&mut self, tile_off: usize) -> Vec<[String; 4]> {
        let wrow = self.b.r();
        self.i(format!(
            "mul.lo.u32 {wrow}, {}, {};",
            self.warp,
            16 * self.w * 16
        ));
        (0..self.d / 16)
            .map(|ks| {
                let a = self.b.r();
                self.i(format!("add.u32 {a}, {}, {wrow};", self.off1[ks]));
                self.ldsm(false, &a, tile_off)
            })
            .collect()
    }

    /// `acc[16 x 64] += A (16 x d, registers) * B^T` where B is an N-major tile at
    /// `tile_off` (64 rows n, d columns k): the score-like products.
    fn prod_nmajor(&mut self, acc: &[Vec<String>], a: &[[String; 4]], tile_off: usize) {
        for np in 0..4 {
            for (ks, af) in a.iter().enumerate() {
                let off = self.off2[ks].clone();
                let r = self.ldsm(false, &off, tile_off + np * 16 * self.w * 16);
                self.mma(&acc[2 * np], af, &r[0], &r[1]);
                self.mma(&acc[2 * np + 1], af, &r[2], &r[3]);
            }
        }
    }

    /// `acc[16 x d] += A (16 x 64, registers, 4 k-steps) * B` where B is a K-major tile at
    /// `tile_off` (64 rows k, d columns n): the value-like products.
    fn prod_kmajor(&mut self, acc: &[Vec<String>], a: &[[String; 4]], tile_off: usize) {
        for (kk, af) in a.iter().enumerate() {
            for dp in 0..self.d / 16 {
                let off = self.off1[dp].clone();
                let r = self.ldsm(true, &off, tile_off + kk * 16 * self.w * 16);
                self.mma(&acc[2 * dp], af, &r[0], &r[1]);
                self.mma(&acc[2 * dp + 1], af, &r[2], &r[3]);
            }
        }
    }

    /// Rounds a 16 x 64 f32 accumulator (8 n-tiles) to 4 k-steps of A fragments.
    fn pack_a(&mut self, s: &[Vec<String>]) -> Vec<[String; 4]> {
        let t = ty(self.dt);
        let mut pack = |hi: &str, lo: &str| {
            let r = self.b.r();
            self.b.i(format!("cvt.rn.{t}x2.f32 {r}, {hi}, {lo};"));
            r
        };
        (0..4)
            .map(|kk| {
                let (x, y) = (&s[2 * kk], &s[2 * kk + 1]);
                [
                    pack(&x[1], &x[0]),
                    pack(&x[3], &x[2]),
                    pack(&y[1], &y[0]),
                    pack(&y[3], &y[2]),
                ]
            })
            .collect()
    }

    /// Copies the 64-token tile starting at token `tok0` into shared memory at `tile_off`:
    /// row `r` from `src + r * stride` (bytes; `src` points at the head's first column of
    /// token 0 of this batch entry). Tokens `>= t` and columns `>= hs` are zero-filled.
    /// One commit group.
    #[allow(clippy::too_many_arguments)]
    fn load_tile(
        &mut self,
        tile_off: usize,
        src: &str,
        stride: &str,
        tok0: &str,
        t: &str,
        col_ok: &str,
        fallback: &str,
    ) {
        let rows_per_pass = THREADS as usize / self.w;
        let colb = self.b.rd();
        self.i(format!("mul.wide.u32 {colb}, {}, 16;", self.ld_chunk));
        let base = self.b.rd();
        self.i(format!("add.u64 {base}, {src}, {colb};"));
        let tok = self.b.r();
        self.i(format!("add.u32 {tok}, {tok0}, {};", self.ld_row));
        for pass in 0..self.w / 2 {
            if pass > 0 {
                self.i(format!("add.u32 {tok}, {tok}, {rows_per_pass};"));
            }
            let p = self.b.p();
            self.i(format!("setp.lt.and.u32 {p}, {tok}, {t}, {col_ok};"));
            let addr = self.b.rd();
            self.i(format!("mul.wide.u32 {addr}, {tok}, {stride};"));
            self.i(format!("add.u64 {addr}, {addr}, {base};"));
            self.i(format!("selp.b64 {addr}, {addr}, {fallback}, {p};"));
            let nb = self.b.r();
            self.i(format!("selp.u32 {nb}, 16, 0, {p};"));
            self.i(format!(
                "cp.async.cg.shared.global [{}+{}], [{addr}], 16, {nb};",
                self.ld_dst,
                tile_off + pass * rows_per_pass * self.w * 16
            ));
        }
        self.i("cp.async.commit_group;");
    }

    /// Stores a 16 x d f32 accumulator (times `mul`, if given) as this warp's rows `row0 + g`
    /// and `row0 + g + 8` of `dst + row * stride` (bytes), columns `< hs`, rows `< t`.
    #[allow(clippy::too_many_arguments)]
    fn store_rows(
        &mut self,
        acc: &[Vec<String>],
        mul: Option<&str>,
        dst: &str,
        stride: &str,
        row0: &str,
        t: &str,
        hs: &str,
    ) {
        let t_ty = ty(self.dt);
        let col0 = self.b.r();
        self.i(format!("shl.b32 {col0}, {}, 1;", self.q));
        for half in 0..2 {
            let row = self.b.r();
            self.i(format!("add.u32 {row}, {row0}, {};", 8 * half));
            let prow = self.b.p();
            self.i(format!("setp.lt.u32 {prow}, {row}, {t};"));
            let base = self.b.rd();
            self.i(format!("mul.wide.u32 {base}, {row}, {stride};"));
            self.i(format!("add.u64 {base}, {base}, {dst};"));
            let cb = self.b.rd();
            self.i(format!("mul.wide.u32 {cb}, {col0}, 2;"));
            self.i(format!("add.u64 {base}, {base}, {cb};"));
            for (j, frag) in acc.iter().enumerate() {
                let col = self.b.r();
                self.i(format!("add.u32 {col}, {col0}, {};", 8 * j));
                let p = self.b.p();
                self.i(format!("setp.lt.and.u32 {p}, {col}, {hs}, {prow};"));
                let (lo, hi) = (&frag[2 * half], &frag[2 * half + 1]);
                let (lo, hi) = match mul {
                    Some(m) => {
                        let (x, y) = (self.b.f(), self.b.f());
                        self.i(format!("mul.f32 {x}, {lo}, {m};"));
                        self.i(format!("mul.f32 {y}, {hi}, {m};"));
                        (x, y)
                    }
                    None => (lo.clone(), hi.clone()),
                };
                let v = self.b.r();
                self.i(format!("cvt.rn.{t_ty}x2.f32 {v}, {hi}, {lo};"));
                self.i(format!("@{p} st.global.b32 [{base}+{}], {v};", 16 * j));
            }
        }
    }

    /// Sets `s` (16 x 64 scores of this warp: rows `warp*16 + g (+8)`, columns `8j + 2q + e`
    /// relative to the tile) to `-inf` (or `fill`) where the column is after the row
    /// (`cols_after_rows`) or, for the transposed dK/dV scores (rows are keys, columns
    /// queries), where the row is after the column.
    fn causal_mask(&mut self, s: &[Vec<String>], rows_are_queries: bool, fill: f32) {
        let rel = self.b.r();
        self.i(format!("shl.b32 {rel}, {}, 4;", self.warp));
        self.i(format!("add.u32 {rel}, {rel}, {};", self.g));
        let col0 = self.b.r();
        self.i(format!("shl.b32 {col0}, {}, 1;", self.q));
        let fill = f32_imm(fill);
        for half in 0..2 {
            let row = self.b.r();
            self.i(format!("add.u32 {row}, {rel}, {};", 8 * half));
            for (j, frag) in s.iter().enumerate() {
                for e in 0..2 {
                    let col = self.b.r();
                    self.i(format!("add.u32 {col}, {col0}, {};", 8 * j + e));
                    let p = self.b.p();
                    if rows_are_queries {
                        self.i(format!("setp.gt.u32 {p}, {col}, {row};"));
                    } else {
                        self.i(format!("setp.gt.u32 {p}, {row}, {col};"));
                    }
                    let v = &frag[2 * half + e];
                    self.i(format!("selp.f32 {v}, {fill}, {v}, {p};"));
                }
            }
        }
    }
}

/// The registers every tiled kernel starts from.
struct Common {
    t: String,
    nh: String,
    hs: String,
    scale: String,
    /// Batch entry, head, tile index (`ctaid.z, .y, .x`).
    bz: String,
    h: String,
    tile: String,
    /// Bytes between tokens of qkv (`3 C * 2`) and of a `(B, T, C)` tensor (`C * 2`).
    stride3: String,
    stride1: String,
    /// `hs` columns times 2 bytes of head `h`: offset of the head in a `C`-wide row.
    head_off: String,
    /// `C * 2`.
    c_bytes: String,
    /// This thread's loader chunk holds head columns (`chunk * 8 < hs`).
    col_ok: String,
    /// Batch row base `bz * T`.
    bt: String,
}

/// Writes the entry line, parameters and the per-thread set-up.
fn start(dt: Elem, d: usize, params: &[(&str, &str)]) -> (Gen, Common, Vec<(String, String)>) {
    let mut b = Body::new();
    let mut loaded = Vec::new();
    for (name, t) in params {
        let (rty, ld) = match *t {
            "u64" => (".b64", "ld.param.u64"),
            "f32" => (".f32", "ld.param.f32"),
            _ => (".b32", "ld.param.u32"),
        };
        let r = b.named(rty, name);
        b.i(format!("{ld} {r}, [p_{name}];"));
        if *t == "u64" {
            b.i(format!("cvta.to.global.u64 {r}, {r};"));
        }
        loaded.push((name.to_string(), r));
    }
    let get = |n: &str| {
        loaded
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, r)| r.clone())
            .expect("parameter")
    };
    let (t, nh, hs, scale) = (get("t"), get("nh"), get("hs"), get("scale"));
    let w = d / 8;
    let tid = b.named(".b32", "thr");
    b.i(format!("mov.u32 {tid}, %tid.x;"));
    let sbase = b.named(".b32", "sbase");
    b.i(format!("mov.u32 {sbase}, flash_smem;"));
    let lane = b.r();
    b.i(format!("and.b32 {lane}, {tid}, 31;"));
    let warp = b.named(".b32", "warp");
    b.i(format!("shr.u32 {warp}, {tid}, 5;"));
    let g = b.named(".b32", "grp");
    b.i(format!("shr.u32 {g}, {lane}, 2;"));
    let q = b.named(".b32", "quad");
    b.i(format!("and.b32 {q}, {lane}, 3;"));
    let mut kg = Gen {
        b,
        dt,
        d,
        w,
        sbase,
        warp,
        g,
        q,
        off1: Vec::new(),
        off2: Vec::new(),
        ld_chunk: String::new(),
        ld_row: String::new(),
        ld_dst: String::new(),
    };
    kg.b.c("ldmatrix lane offsets: P1 and P2 patterns, one register per even chunk");
    let (ri, mi) = (kg.b.r(), kg.b.r());
    kg.i(format!("and.b32 {ri}, {lane}, 7;"));
    kg.i(format!("shr.u32 {mi}, {lane}, 3;"));
    for pattern in 0..2 {
        // P1: row ri + 8 (mi & 1), chunk mi >> 1; P2: row ri + 8 (mi >> 1), chunk mi & 1.
        let (rbit, cbit) = (kg.b.r(), kg.b.r());
        if pattern == 0 {
            kg.i(format!("and.b32 {rbit}, {mi}, 1;"));
            kg.i(format!("shr.u32 {cbit}, {mi}, 1;"));
        } else {
            kg.i(format!("shr.u32 {rbit}, {mi}, 1;"));
            kg.i(format!("and.b32 {cbit}, {mi}, 1;"));
        }
        let row = kg.b.r();
        kg.i(format!("mad.lo.u32 {row}, {rbit}, 8, {ri};"));
        for c0 in (0..w).step_by(2) {
            let ch = kg.b.r();
            kg.i(format!("add.u32 {ch}, {cbit}, {c0};"));
            let a = kg.smem_addr(&row, &ch);
            if pattern == 0 {
                kg.off1.push(a);
            } else {
                kg.off2.push(a);
            }
        }
    }
    kg.b.c("tile loader: chunk tid % W of rows tid / W + k * (128 / W)");
    let ld_chunk = kg.b.named(".b32", "ldc");
    kg.i(format!("and.b32 {ld_chunk}, {tid}, {};", w - 1));
    let ld_row = kg.b.named(".b32", "ldr");
    kg.i(format!("shr.u32 {ld_row}, {tid}, {};", w.trailing_zeros()));
    let dst = kg.smem_addr(&ld_row, &ld_chunk);
    kg.ld_chunk = ld_chunk.clone();
    kg.ld_row = ld_row;
    kg.ld_dst = dst;

    kg.b.c("block: batch entry ctaid.z, head ctaid.y, 64-row tile ctaid.x");
    let bz = kg.b.named(".b32", "bz");
    kg.i(format!("mov.u32 {bz}, %ctaid.z;"));
    let h = kg.b.named(".b32", "head");
    kg.i(format!("mov.u32 {h}, %ctaid.y;"));
    let tile = kg.b.named(".b32", "tile");
    kg.i(format!("mov.u32 {tile}, %ctaid.x;"));
    let c = kg.b.r();
    kg.i(format!("mul.lo.u32 {c}, {nh}, {hs};"));
    let c_bytes = kg.b.named(".b32", "cbytes");
    kg.i(format!("shl.b32 {c_bytes}, {c}, 1;"));
    let stride1 = c_bytes.clone();
    let stride3 = kg.b.named(".b32", "stride3");
    kg.i(format!("mul.lo.u32 {stride3}, {c_bytes}, 3;"));
    let head_off = kg.b.named(".b32", "headoff");
    kg.i(format!("mul.lo.u32 {head_off}, {h}, {hs};"));
    kg.i(format!("shl.b32 {head_off}, {head_off}, 1;"));
    let col_ok = kg.b.named(".pred", "colok");
    let cc = kg.b.r();
    kg.i(format!("shl.b32 {cc}, {ld_chunk}, 3;"));
    kg.i(format!("setp.lt.u32 {col_ok}, {cc}, {hs};"));
    let bt = kg.b.named(".b32", "bt");
    kg.i(format!("mul.lo.u32 {bt}, {bz}, {t};"));
    let common = Common {
        t,
        nh,
        hs,
        scale,
        bz,
        h,
        tile,
        stride3,
        stride1,
        head_off,
        c_bytes,
        col_ok,
        bt,
    };
    (kg, common, loaded)
}

/// Pointer to `(token 0 of batch entry bz, column off_bytes)` of a tensor with `stride` bytes
/// per token.
fn batch_ptr(kg: &mut Gen, base: &str, bt: &str, stride: &str, off_bytes: &str) -> String {
    let p = kg.b.rd();
    kg.i(format!("mul.wide.u32 {p}, {bt}, {stride};"));
    kg.i(format!("add.u64 {p}, {p}, {base};"));
    let o = kg.b.rd();
    kg.i(format!("cvt.u64.u32 {o}, {off_bytes};"));
    kg.i(format!("add.u64 {p}, {p}, {o};"));
    p
}

/// `head_off + k * C * 2`: the byte column of part `k` (0 q, 1 k, 2 v) of the head in qkv.
fn part_off(kg: &mut Gen, c: &Common, k: u32) -> String {
    let o = kg.b.r();
    kg.i(format!(
        "mad.lo.u32 {o}, {}, {k}, {};",
        c.c_bytes, c.head_off
    ));
    o
}

/// The byte columns of head `h`'s queries, keys and values in a qkv row, and pointers to them
/// at token 0 of the block's batch entry.
struct Parts {
    qo: String,
    ko: String,
    vo: String,
    qsrc: String,
    ksrc: String,
    vsrc: String,
}

fn parts(kg: &mut Gen, c: &Common, qkv: &str) -> Parts {
    let qo = part_off(kg, c, 0);
    let ko = part_off(kg, c, 1);
    let vo = part_off(kg, c, 2);
    let qsrc = batch_ptr(kg, qkv, &c.bt, &c.stride3, &qo);
    let ksrc = batch_ptr(kg, qkv, &c.bt, &c.stride3, &ko);
    let vsrc = batch_ptr(kg, qkv, &c.bt, &c.stride3, &vo);
    Parts {
        qo,
        ko,
        vo,
        qsrc,
        ksrc,
        vsrc,
    }
}

/// Quad reductions (lanes `4g..4g+3`) of one register.
fn quad_reduce(kg: &mut Gen, v: &str, op: &str) {
    for off in [1, 2] {
        let t = kg.b.f();
        kg.i(format!("shfl.sync.bfly.b32 {t}, {v}, {off}, 31, -1;"));
        kg.i(format!("{op}.f32 {v}, {v}, {t};"));
    }
}

/// Wraps a body into `.visible .entry` text.
fn finish(entry: &str, kg: Gen, params: &[(&str, &str)], kind: Kind) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\n.visible .entry {entry}(");
    let list: Vec<String> = params
        .iter()
        .map(|(n, t)| format!("\t.param .{t} p_{n}"))
        .collect();
    let _ = writeln!(s, "{}\n)", list.join(",\n"));
    let _ = writeln!(s, ".maxntid {THREADS}, 1, 1");
    let _ = writeln!(s, "{{");
    let _ = writeln!(
        s,
        "\t.shared .align 128 .b8 flash_smem[{}];",
        shared_bytes(kind, kg.d)
    );
    s.push_str(&kg.b.declarations());
    s.push_str(&kg.b.text);
    s.push_str("\tret;\n}\n");
    s
}

/// The forward: `entry(qkv, y, lse, t, nh, hs, scale)`.
pub(crate) fn forward(entry: &str, dt: Elem, d: usize) -> String {
    let params = [
        ("qkv", "u64"),
        ("y", "u64"),
        ("lse", "u64"),
        ("t", "u32"),
        ("nh", "u32"),
        ("hs", "u32"),
        ("scale", "f32"),
    ];
    let (mut kg, c, p) = start(dt, d, &params);
    let (qkv, y, lse) = (p[0].1.clone(), p[1].1.clone(), p[2].1.clone());
    let tb = tile_bytes(d);
    let (q_off, k_off, v_off) = (0, tb, 2 * tb);
    let Parts {
        qsrc, ksrc, vsrc, ..
    } = parts(&mut kg, &c, &qkv);
    let q0 = kg.b.named(".b32", "q0");
    kg.i(format!("shl.b32 {q0}, {}, 6;", c.tile));
    kg.b.c("Q tile -> shared -> A fragments (kept in registers)");
    kg.load_tile(q_off, &qsrc, &c.stride3, &q0, &c.t, &c.col_ok, &qkv);
    kg.i("cp.async.wait_group 0;");
    kg.i("bar.sync 0;");
    let qa = kg.warp_a_frags(q_off);
    let sl2 = kg.b.named(".f32", "sl2");
    kg.i(format!("mul.f32 {sl2}, {}, {};", c.scale, f32_imm(LOG2E)));
    let nt = d / 8;
    let o: Vec<Vec<String>> = (0..nt).map(|_| kg.zeros(4)).collect();
    let (m, l) = ([kg.b.f(), kg.b.f()], [kg.b.f(), kg.b.f()]);
    for k in 0..2 {
        kg.i(format!("mov.f32 {}, {};", m[k], f32_imm(-1e30)));
        kg.i(format!("mov.f32 {}, 0f00000000;", l[k]));
    }
    let kb = kg.b.named(".b32", "kb");
    kg.i(format!("mov.u32 {kb}, 0;"));
    let top = kg.b.label("kv");
    let nodiag = kg.b.label("nodiag");
    kg.b.put_label(&top);
    kg.b.c("K and V tiles of keys kb*64.. (two commit groups: S needs only K)");
    kg.i("bar.sync 0;");
    let k0 = kg.b.r();
    kg.i(format!("shl.b32 {k0}, {kb}, 6;"));
    kg.load_tile(k_off, &ksrc, &c.stride3, &k0, &c.t, &c.col_ok, &qkv);
    kg.load_tile(v_off, &vsrc, &c.stride3, &k0, &c.t, &c.col_ok, &qkv);
    kg.i("cp.async.wait_group 1;");
    kg.i("bar.sync 0;");
    kg.b.c("S = Q K^T (16 x 64 per warp), in log2 units");
    let s: Vec<Vec<String>> = (0..8).map(|_| kg.zeros(4)).collect();
    kg.prod_nmajor(&s, &qa, k_off);
    for v in s.iter().flatten() {
        kg.i(format!("mul.f32 {v}, {v}, {sl2};"));
    }
    let pd = kg.b.p();
    kg.i(format!("setp.ne.u32 {pd}, {kb}, {};", c.tile));
    kg.i(format!("@{pd} bra.uni {nodiag};"));
    kg.causal_mask(&s, true, f32::NEG_INFINITY);
    kg.b.put_label(&nodiag);
    kg.b.c("online softmax: running max m, sum l (per row g, g+8), rescale O");
    for half in 0..2 {
        let mx = kg.b.f();
        kg.i(format!("mov.f32 {mx}, {};", m[half]));
        for frag in &s {
            for e in 0..2 {
                kg.i(format!("max.f32 {mx}, {mx}, {};", frag[2 * half + e]));
            }
        }
        quad_reduce(&mut kg, &mx, "max");
        let alpha = kg.b.f();
        kg.i(format!("sub.f32 {alpha}, {}, {mx};", m[half]));
        kg.i(format!("ex2.approx.ftz.f32 {alpha}, {alpha};"));
        kg.i(format!("mov.f32 {}, {mx};", m[half]));
        let sum = kg.b.f();
        kg.i(format!("mov.f32 {sum}, 0f00000000;"));
        for frag in &s {
            for e in 0..2 {
                let v = &frag[2 * half + e];
                kg.i(format!("sub.f32 {v}, {v}, {mx};"));
                kg.i(format!("ex2.approx.ftz.f32 {v}, {v};"));
                kg.i(format!("add.f32 {sum}, {sum}, {v};"));
            }
        }
        kg.i(format!(
            "fma.rn.f32 {}, {}, {alpha}, {sum};",
            l[half], l[half]
        ));
        for frag in &o {
            for e in 0..2 {
                let v = &frag[2 * half + e];
                kg.i(format!("mul.f32 {v}, {v}, {alpha};"));
            }
        }
    }
    let pa = kg.pack_a(&s);
    kg.i("cp.async.wait_group 0;");
    kg.i("bar.sync 0;");
    kg.b.c("O += P V");
    kg.prod_kmajor(&o, &pa, v_off);
    kg.i(format!("add.u32 {kb}, {kb}, 1;"));
    let pl = kg.b.p();
    kg.i(format!("setp.le.u32 {pl}, {kb}, {};", c.tile));
    kg.i(format!("@{pl} bra.uni {top};"));

    kg.b.c("O / l -> y; lse = (m + log2 l) ln 2 (natural log)");
    let inv = [kg.b.f(), kg.b.f()];
    for half in 0..2 {
        quad_reduce(&mut kg, &l[half], "add");
        kg.i(format!("rcp.rn.f32 {}, {};", inv[half], l[half]));
    }
    let row0 = kg.b.r();
    kg.i(format!("mad.lo.u32 {row0}, {}, 16, {q0};", kg.warp));
    kg.i(format!("add.u32 {row0}, {row0}, {};", kg.g));
    // Normalise in place (rows g and g + 8 have different 1/l).
    for frag in &o {
        for k in 0..4 {
            kg.i(format!("mul.f32 {}, {}, {};", frag[k], frag[k], inv[k / 2]));
        }
    }
    let ydst = batch_ptr(&mut kg, &y, &c.bt, &c.stride1, &c.head_off);
    kg.store_rows(&o, None, &ydst, &c.stride1, &row0, &c.t, &c.hs);
    let lrow = kg.b.r();
    kg.i(format!("mad.lo.u32 {lrow}, {}, {}, {};", c.bz, c.nh, c.h));
    kg.i(format!("mul.lo.u32 {lrow}, {lrow}, {};", c.t));
    for half in 0..2 {
        let row = kg.b.r();
        kg.i(format!("add.u32 {row}, {row0}, {};", 8 * half));
        let p = kg.b.p();
        kg.i(format!("setp.lt.u32 {p}, {row}, {};", c.t));
        let pq = kg.b.p();
        kg.i(format!("setp.eq.and.u32 {pq}, {}, 0, {p};", kg.q));
        let v = kg.b.f();
        kg.i(format!("lg2.approx.f32 {v}, {};", l[half]));
        kg.i(format!("add.f32 {v}, {v}, {};", m[half]));
        kg.i(format!("mul.f32 {v}, {v}, {};", f32_imm(LN2)));
        let idx = kg.b.r();
        kg.i(format!("add.u32 {idx}, {lrow}, {row};"));
        let a = kg.b.rd();
        kg.i(format!("mul.wide.u32 {a}, {idx}, 4;"));
        kg.i(format!("add.u64 {a}, {a}, {lse};"));
        kg.i(format!("@{pq} st.global.f32 [{a}], {v};"));
    }
    finish(entry, kg, &params, Kind::Fwd)
}

/// Loads `lse * log2(e)` and `dvec` of rows `row` (`< t`, else `+inf` and 0) of head row base
/// `lrow` into registers.
fn row_stats(kg: &mut Gen, lse: &str, dvec: &str, lrow: &str, row: &str, t: &str) -> [String; 2] {
    let p = kg.b.p();
    kg.i(format!("setp.lt.u32 {p}, {row}, {t};"));
    let idx = kg.b.r();
    kg.i(format!("add.u32 {idx}, {lrow}, {row};"));
    let off = kg.b.rd();
    kg.i(format!("mul.wide.u32 {off}, {idx}, 4;"));
    let (a, b) = (kg.b.rd(), kg.b.rd());
    kg.i(format!("add.u64 {a}, {off}, {lse};"));
    kg.i(format!("add.u64 {b}, {off}, {dvec};"));
    let (x, y) = (kg.b.f(), kg.b.f());
    kg.i(format!("mov.f32 {x}, {};", f32_imm(f32::INFINITY)));
    kg.i(format!("mov.f32 {y}, 0f00000000;"));
    kg.i(format!("@{p} ld.global.f32 {x}, [{a}];"));
    kg.i(format!("@{p} ld.global.f32 {y}, [{b}];"));
    kg.i(format!("mul.f32 {x}, {x}, {};", f32_imm(LOG2E)));
    [x, y]
}

/// The dQ pass: `entry(qkv, dy, lse, dvec, dqkv, t, nh, hs, scale)`; writes the query part.
pub(crate) fn backward_dq(entry: &str, dt: Elem, d: usize) -> String {
    let params = bwd_params();
    let (mut kg, c, p) = start(dt, d, &params);
    let [qkv, dy, lse, dvec, dqkv]: [String; 5] = std::array::from_fn(|i| p[i].1.clone());
    let tb = tile_bytes(d);
    let (q_off, do_off, k_off, v_off) = (0, tb, 2 * tb, 3 * tb);
    let Parts {
        qo,
        qsrc,
        ksrc,
        vsrc,
        ..
    } = parts(&mut kg, &c, &qkv);
    let dosrc = batch_ptr(&mut kg, &dy, &c.bt, &c.stride1, &c.head_off);
    let q0 = kg.b.named(".b32", "q0");
    kg.i(format!("shl.b32 {q0}, {}, 6;", c.tile));
    kg.b.c("Q and dO tiles -> A fragments");
    kg.load_tile(q_off, &qsrc, &c.stride3, &q0, &c.t, &c.col_ok, &qkv);
    kg.load_tile(do_off, &dosrc, &c.stride1, &q0, &c.t, &c.col_ok, &dy);
    kg.i("cp.async.wait_group 0;");
    kg.i("bar.sync 0;");
    let qa = kg.warp_a_frags(q_off);
    let doa = kg.warp_a_frags(do_off);
    let sl2 = kg.b.named(".f32", "sl2");
    kg.i(format!("mul.f32 {sl2}, {}, {};", c.scale, f32_imm(LOG2E)));
    let row0 = kg.b.r();
    kg.i(format!("mad.lo.u32 {row0}, {}, 16, {q0};", kg.warp));
    kg.i(format!("add.u32 {row0}, {row0}, {};", kg.g));
    let lrow = kg.b.r();
    kg.i(format!("mad.lo.u32 {lrow}, {}, {}, {};", c.bz, c.nh, c.h));
    kg.i(format!("mul.lo.u32 {lrow}, {lrow}, {};", c.t));
    let row8 = kg.b.r();
    kg.i(format!("add.u32 {row8}, {row0}, 8;"));
    let st = [
        row_stats(&mut kg, &lse, &dvec, &lrow, &row0, &c.t),
        row_stats(&mut kg, &lse, &dvec, &lrow, &row8, &c.t),
    ];
    let nt = d / 8;
    let dq: Vec<Vec<String>> = (0..nt).map(|_| kg.zeros(4)).collect();
    let kb = kg.b.named(".b32", "kb");
    kg.i(format!("mov.u32 {kb}, 0;"));
    let top = kg.b.label("kv");
    let nodiag = kg.b.label("nodiag");
    kg.b.put_label(&top);
    kg.i("bar.sync 0;");
    let k0 = kg.b.r();
    kg.i(format!("shl.b32 {k0}, {kb}, 6;"));
    kg.load_tile(k_off, &ksrc, &c.stride3, &k0, &c.t, &c.col_ok, &qkv);
    kg.load_tile(v_off, &vsrc, &c.stride3, &k0, &c.t, &c.col_ok, &qkv);
    kg.i("cp.async.wait_group 1;");
    kg.i("bar.sync 0;");
    kg.b.c("P = exp(scale Q K^T - lse)");
    let s: Vec<Vec<String>> = (0..8).map(|_| kg.zeros(4)).collect();
    kg.prod_nmajor(&s, &qa, k_off);
    for frag in &s {
        for k in 0..4 {
            let v = &frag[k];
            kg.i(format!("mul.f32 {v}, {v}, {sl2};"));
            kg.i(format!("sub.f32 {v}, {v}, {};", st[k / 2][0]));
        }
    }
    let pd = kg.b.p();
    kg.i(format!("setp.ne.u32 {pd}, {kb}, {};", c.tile));
    kg.i(format!("@{pd} bra.uni {nodiag};"));
    kg.causal_mask(&s, true, f32::NEG_INFINITY);
    kg.b.put_label(&nodiag);
    for v in s.iter().flatten() {
        kg.i(format!("ex2.approx.ftz.f32 {v}, {v};"));
    }
    kg.i("cp.async.wait_group 0;");
    kg.i("bar.sync 0;");
    kg.b.c("dP = dO V^T; dS = P (dP - D)");
    let dp: Vec<Vec<String>> = (0..8).map(|_| kg.zeros(4)).collect();
    kg.prod_nmajor(&dp, &doa, v_off);
    for (pf, df) in s.iter().zip(&dp) {
        for k in 0..4 {
            kg.i(format!("sub.f32 {}, {}, {};", df[k], df[k], st[k / 2][1]));
            kg.i(format!("mul.f32 {}, {}, {};", df[k], df[k], pf[k]));
        }
    }
    let dsa = kg.pack_a(&dp);
    kg.b.c("dQ += dS K");
    kg.prod_kmajor(&dq, &dsa, k_off);
    kg.i(format!("add.u32 {kb}, {kb}, 1;"));
    let pl = kg.b.p();
    kg.i(format!("setp.le.u32 {pl}, {kb}, {};", c.tile));
    kg.i(format!("@{pl} bra.uni {top};"));
    let qdst = batch_ptr(&mut kg, &dqkv, &c.bt, &c.stride3, &qo);
    kg.store_rows(&dq, Some(&c.scale), &qdst, &c.stride3, &row0, &c.t, &c.hs);
    finish(entry, kg, &params, Kind::Dq)
}

fn bwd_params() -> [(&'static str, &'static str); 9] {
    [
        ("qkv", "u64"),
        ("dy", "u64"),
        ("lse", "u64"),
        ("dvec", "u64"),
        ("dqkv", "u64"),
        ("t", "u32"),
        ("nh", "u32"),
        ("hs", "u32"),
        ("scale", "f32"),
    ]
}

/// The dK/dV pass: `entry(qkv, dy, lse, dvec, dqkv, t, nh, hs, scale)`; writes the key and
/// value parts.
pub(crate) fn backward_dkdv(entry: &str, dt: Elem, d: usize) -> String {
    let params = bwd_params();
    let (mut kg, c, p) = start(dt, d, &params);
    let [qkv, dy, lse, dvec, dqkv]: [String; 5] = std::array::from_fn(|i| p[i].1.clone());
    let tb = tile_bytes(d);
    let (k_off, v_off, q_off, do_off) = (0, tb, 2 * tb, 3 * tb);
    let (lse_off, dvec_off) = (4 * tb, 4 * tb + 4 * BR as usize);
    let Parts {
        ko,
        vo,
        qsrc,
        ksrc,
        vsrc,
        ..
    } = parts(&mut kg, &c, &qkv);
    let dosrc = batch_ptr(&mut kg, &dy, &c.bt, &c.stride1, &c.head_off);
    let k0 = kg.b.named(".b32", "k0");
    kg.i(format!("shl.b32 {k0}, {}, 6;", c.tile));
    kg.b.c("K and V tiles -> A fragments");
    kg.load_tile(k_off, &ksrc, &c.stride3, &k0, &c.t, &c.col_ok, &qkv);
    kg.load_tile(v_off, &vsrc, &c.stride3, &k0, &c.t, &c.col_ok, &qkv);
    kg.i("cp.async.wait_group 0;");
    kg.i("bar.sync 0;");
    let ka = kg.warp_a_frags(k_off);
    let va = kg.warp_a_frags(v_off);
    let sl2 = kg.b.named(".f32", "sl2");
    kg.i(format!("mul.f32 {sl2}, {}, {};", c.scale, f32_imm(LOG2E)));
    let lrow = kg.b.r();
    kg.i(format!("mad.lo.u32 {lrow}, {}, {}, {};", c.bz, c.nh, c.h));
    kg.i(format!("mul.lo.u32 {lrow}, {lrow}, {};", c.t));
    let ntiles = kg.b.named(".b32", "ntiles");
    kg.i(format!("add.u32 {ntiles}, {}, 63;", c.t));
    kg.i(format!("shr.u32 {ntiles}, {ntiles}, 6;"));
    // Per-thread statistics slot: threads 0..63 load one query's lse and D per tile.
    let tid = "%thr";
    let pstat = kg.b.p();
    kg.i(format!("setp.lt.u32 {pstat}, {tid}, {BR};"));
    let sslot = kg.b.r();
    kg.i(format!("shl.b32 {sslot}, {tid}, 2;"));
    kg.i(format!("add.u32 {sslot}, {sslot}, {};", kg.sbase));
    let col0 = kg.b.r();
    kg.i(format!("shl.b32 {col0}, {}, 3;", kg.q));
    kg.i(format!("add.u32 {col0}, {col0}, {};", kg.sbase));
    let nt = d / 8;
    let dk: Vec<Vec<String>> = (0..nt).map(|_| kg.zeros(4)).collect();
    let dv: Vec<Vec<String>> = (0..nt).map(|_| kg.zeros(4)).collect();
    let qt = kg.b.named(".b32", "qt");
    kg.i(format!("mov.u32 {qt}, {};", c.tile));
    let top = kg.b.label("q");
    let nodiag = kg.b.label("nodiag");
    let done = kg.b.label("done");
    let pnone = kg.b.p();
    kg.i(format!("setp.ge.u32 {pnone}, {qt}, {ntiles};"));
    kg.i(format!("@{pnone} bra.uni {done};"));
    kg.b.put_label(&top);
    kg.i("bar.sync 0;");
    let q0 = kg.b.r();
    kg.i(format!("shl.b32 {q0}, {qt}, 6;"));
    kg.b.c("Q and dO tiles of queries qt*64.., their lse (log2 units) and D");
    kg.load_tile(q_off, &qsrc, &c.stride3, &q0, &c.t, &c.col_ok, &qkv);
    kg.load_tile(do_off, &dosrc, &c.stride1, &q0, &c.t, &c.col_ok, &dy);
    let qrow = kg.b.r();
    kg.i(format!("add.u32 {qrow}, {q0}, {tid};"));
    let [x, y] = row_stats(&mut kg, &lse, &dvec, &lrow, &qrow, &c.t);
    kg.i(format!("@{pstat} st.shared.f32 [{sslot}+{lse_off}], {x};"));
    kg.i(format!("@{pstat} st.shared.f32 [{sslot}+{dvec_off}], {y};"));
    kg.i("cp.async.wait_group 1;");
    kg.i("bar.sync 0;");
    kg.b.c("S^T = K Q^T (16 keys x 64 queries per warp); P^T = exp(scale S^T - lse[col])");
    let s: Vec<Vec<String>> = (0..8).map(|_| kg.zeros(4)).collect();
    kg.prod_nmajor(&s, &ka, q_off);
    let stats: Vec<[String; 4]> = (0..8)
        .map(|j| {
            let (a, b, c2, d2) = (kg.b.f(), kg.b.f(), kg.b.f(), kg.b.f());
            kg.i(format!(
                "ld.shared.v2.f32 {{{a}, {b}}}, [{col0}+{}];",
                lse_off + 32 * j
            ));
            kg.i(format!(
                "ld.shared.v2.f32 {{{c2}, {d2}}}, [{col0}+{}];",
                dvec_off + 32 * j
            ));
            [a, b, c2, d2]
        })
        .collect();
    for (frag, stj) in s.iter().zip(&stats) {
        for k in 0..4 {
            let v = &frag[k];
            kg.i(format!("mul.f32 {v}, {v}, {sl2};"));
            kg.i(format!("sub.f32 {v}, {v}, {};", stj[k % 2]));
        }
    }
    let pd = kg.b.p();
    kg.i(format!("setp.ne.u32 {pd}, {qt}, {};", c.tile));
    kg.i(format!("@{pd} bra.uni {nodiag};"));
    kg.causal_mask(&s, false, f32::NEG_INFINITY);
    kg.b.put_label(&nodiag);
    for v in s.iter().flatten() {
        kg.i(format!("ex2.approx.ftz.f32 {v}, {v};"));
    }
    kg.i("cp.async.wait_group 0;");
    kg.i("bar.sync 0;");
    kg.b.c("dV += P^T dO");
    let pa = kg.pack_a(&s);
    kg.prod_kmajor(&dv, &pa, do_off);
    kg.b.c("dP^T = V dO^T; dS^T = P^T (dP^T - D[col]); dK += dS^T Q");
    let dp: Vec<Vec<String>> = (0..8).map(|_| kg.zeros(4)).collect();
    kg.prod_nmajor(&dp, &va, do_off);
    for ((pf, df), stj) in s.iter().zip(&dp).zip(&stats) {
        for k in 0..4 {
            kg.i(format!("sub.f32 {}, {}, {};", df[k], df[k], stj[2 + k % 2]));
            kg.i(format!("mul.f32 {}, {}, {};", df[k], df[k], pf[k]));
        }
    }
    let dsa = kg.pack_a(&dp);
    kg.prod_kmajor(&dk, &dsa, q_off);
    kg.i(format!("add.u32 {qt}, {qt}, 1;"));
    let pl = kg.b.p();
    kg.i(format!("setp.lt.u32 {pl}, {qt}, {ntiles};"));
    kg.i(format!("@{pl} bra.uni {top};"));
    kg.b.put_label(&done);
    let row0 = kg.b.r();
    kg.i(format!("mad.lo.u32 {row0}, {}, 16, {k0};", kg.warp));
    kg.i(format!("add.u32 {row0}, {row0}, {};", kg.g));
    let kdst = batch_ptr(&mut kg, &dqkv, &c.bt, &c.stride3, &ko);
    kg.store_rows(&dk, Some(&c.scale), &kdst, &c.stride3, &row0, &c.t, &c.hs);
    let vdst = batch_ptr(&mut kg, &dqkv, &c.bt, &c.stride3, &vo);
    kg.store_rows(&dv, None, &vdst, &c.stride3, &row0, &c.t, &c.hs);
    finish(entry, kg, &params, Kind::Dkdv)
}

/// The row dot of the backward: `entry(y, dy, dvec, rows, t, nh, hs)` with
/// `dvec[(b nh + h) T + i] = sum_d y[b, i, h hs + d] dy[b, i, h hs + d]` in f32, one warp per
/// (b, h, i), pairs of elements per lane (`hs` even).
pub(crate) fn row_dot(entry: &str, dt: Elem) -> String {
    let params = [
        ("y", "u64"),
        ("dy", "u64"),
        ("dvec", "u64"),
        ("rows", "u32"),
        ("t", "u32"),
        ("nh", "u32"),
        ("hs", "u32"),
    ];
    let mut b = Body::new();
    let mut regs = Vec::new();
    for (name, t) in &params {
        let (rty, ld) = if *t == "u64" {
            (".b64", "ld.param.u64")
        } else {
            (".b32", "ld.param.u32")
        };
        let r = b.named(rty, name);
        b.i(format!("{ld} {r}, [p_{name}];"));
        if *t == "u64" {
            b.i(format!("cvta.to.global.u64 {r}, {r};"));
        }
        regs.push(r);
    }
    let (y, dy, dvec, rows, t, nh, hs) = (
        &regs[0], &regs[1], &regs[2], &regs[3], &regs[4], &regs[5], &regs[6],
    );
    let tid = b.r();
    b.i(format!("mov.u32 {tid}, %tid.x;"));
    let lane = b.r();
    b.i(format!("and.b32 {lane}, {tid}, 31;"));
    let row = b.r();
    b.i(format!("shr.u32 {row}, {tid}, 5;"));
    let cta = b.r();
    b.i(format!("mov.u32 {cta}, %ctaid.x;"));
    b.i(format!("mad.lo.u32 {row}, {cta}, {DOT_ROWS}, {row};"));
    let pout = b.p();
    b.i(format!("setp.ge.u32 {pout}, {row}, {rows};"));
    let done = b.label("done");
    b.i(format!("@{pout} bra.uni {done};"));
    b.c("row = (bz * nh + h) * T + i");
    let i = b.r();
    b.i(format!("rem.u32 {i}, {row}, {t};"));
    let bh = b.r();
    b.i(format!("div.u32 {bh}, {row}, {t};"));
    let h = b.r();
    b.i(format!("rem.u32 {h}, {bh}, {nh};"));
    let bz = b.r();
    b.i(format!("div.u32 {bz}, {bh}, {nh};"));
    let tok = b.r();
    b.i(format!("mad.lo.u32 {tok}, {bz}, {t}, {i};"));
    let c = b.r();
    b.i(format!("mul.lo.u32 {c}, {nh}, {hs};"));
    let e = b.r();
    b.i(format!("mul.lo.u32 {e}, {tok}, {c};"));
    b.i(format!("mad.lo.u32 {e}, {h}, {hs}, {e};"));
    let off = b.rd();
    b.i(format!("mul.wide.u32 {off}, {e}, 2;"));
    let (py, pdy) = (b.rd(), b.rd());
    b.i(format!("add.u64 {py}, {y}, {off};"));
    b.i(format!("add.u64 {pdy}, {dy}, {off};"));
    let acc = b.f();
    b.i(format!("mov.f32 {acc}, 0f00000000;"));
    let col = b.r();
    b.i(format!("shl.b32 {col}, {lane}, 1;"));
    let top = b.label("cols");
    let exit = b.label("cols_done");
    b.put_label(&top);
    // Uniform loop: every lane runs while the warp's first column is in range.
    let base = b.r();
    b.i(format!("sub.u32 {base}, {col}, {lane};"));
    b.i(format!("sub.u32 {base}, {base}, {lane};"));
    let pend = b.p();
    b.i(format!("setp.ge.u32 {pend}, {base}, {hs};"));
    b.i(format!("@{pend} bra.uni {exit};"));
    let pin = b.p();
    b.i(format!("setp.lt.u32 {pin}, {col}, {hs};"));
    let (a, bb) = (b.r(), b.r());
    b.i(format!("mov.u32 {a}, 0;"));
    b.i(format!("mov.u32 {bb}, 0;"));
    let co = b.rd();
    b.i(format!("mul.wide.u32 {co}, {col}, 2;"));
    let (ay, ady) = (b.rd(), b.rd());
    b.i(format!("add.u64 {ay}, {py}, {co};"));
    b.i(format!("add.u64 {ady}, {pdy}, {co};"));
    b.i(format!("@{pin} ld.global.b32 {a}, [{ay}];"));
    b.i(format!("@{pin} ld.global.b32 {bb}, [{ady}];"));
    for half in 0..2 {
        let (ha, hb) = (b.h(), b.h());
        let (x, z) = (b.f(), b.f());
        let t32 = b.r();
        if half == 0 {
            b.i(format!("mov.b32 {t32}, {a};"));
        } else {
            b.i(format!("shr.u32 {t32}, {a}, 16;"));
        }
        b.i(format!("cvt.u16.u32 {ha}, {t32};"));
        let t32b = b.r();
        if half == 0 {
            b.i(format!("mov.b32 {t32b}, {bb};"));
        } else {
            b.i(format!("shr.u32 {t32b}, {bb}, 16;"));
        }
        b.i(format!("cvt.u16.u32 {hb}, {t32b};"));
        up(&mut b, dt, &x, &ha);
        up(&mut b, dt, &z, &hb);
        b.i(format!("fma.rn.f32 {acc}, {x}, {z}, {acc};"));
    }
    b.i(format!("add.u32 {col}, {col}, 64;"));
    b.i(format!("bra.uni {top};"));
    b.put_label(&exit);
    for off in [16, 8, 4, 2, 1] {
        let t = b.f();
        b.i(format!("shfl.sync.bfly.b32 {t}, {acc}, {off}, 31, -1;"));
        b.i(format!("add.f32 {acc}, {acc}, {t};"));
    }
    let p0 = b.p();
    b.i(format!("setp.eq.u32 {p0}, {lane}, 0;"));
    let a = b.rd();
    b.i(format!("mul.wide.u32 {a}, {row}, 4;"));
    b.i(format!("add.u64 {a}, {a}, {dvec};"));
    b.i(format!("@{p0} st.global.f32 [{a}], {acc};"));
    b.put_label(&done);
    let mut s = String::new();
    let _ = writeln!(s, "\n.visible .entry {entry}(");
    let list: Vec<String> = params
        .iter()
        .map(|(n, t)| format!("\t.param .{t} p_{n}"))
        .collect();
    let _ = writeln!(s, "{}\n)", list.join(",\n"));
    let _ = writeln!(s, "{{");
    s.push_str(&b.declarations());
    s.push_str(&b.text);
    s.push_str("\tret;\n}\n");
    s
}

/// `f32 <- bf16/f16` from a 16-bit register.
fn up(b: &mut Body, dt: Elem, f: &str, h: &str) {
    match dt {
        Elem::BF16 => {
            let r = b.r();
            b.i(format!("cvt.u32.u16 {r}, {h};"));
            b.i(format!("shl.b32 {r}, {r}, 16;"));
            b.i(format!("mov.b32 {f}, {r};"));
        }
        _ => b.i(format!("cvt.f32.f16 {f}, {h};")),
    }
}
