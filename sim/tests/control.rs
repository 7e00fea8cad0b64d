//! Control flow (divergence and reconvergence), multi-block grids, parallel blocks, atomics and
//! device memory behaviour.

mod common;
use common::*;
use lathe_sim::{ErrorKind, Launch, Param, Sim, SimConfig};

const HEADER: &str = ".version 8.0
.target sm_80
.address_size 64
";

/// Lane l loops l % 7 + 1 times adding its index, then branches three ways, then all lanes
/// reconverge and do a warp-wide shuffle (which needs every lane, so a reconvergence bug
/// is a Barrier error).
const DIVERGE: &str = ".visible .entry k(.param .u64 out)
{
.reg .b32 %r<16>;
.reg .b64 %rd<4>;
.reg .pred %p<4>;
ld.param.u64 %rd0, [out];
mov.u32 %r1, %tid.x;
rem.u32 %r2, %r1, 7; add.u32 %r2, %r2, 1;
mov.u32 %r3, 0; mov.u32 %r4, 0;
LOOP:
add.u32 %r3, %r3, %r1;
add.u32 %r4, %r4, 1;
setp.lt.u32 %p0, %r4, %r2;
@%p0 bra LOOP;
and.b32 %r5, %r1, 3;
setp.eq.u32 %p1, %r5, 0;
@%p1 bra A;
setp.eq.u32 %p2, %r5, 1;
@%p2 bra B;
mul.lo.u32 %r3, %r3, 3;
bra.uni J;
A:
add.u32 %r3, %r3, 1000;
bra.uni J;
B:
shl.b32 %r3, %r3, 1;
J:
shfl.sync.bfly.b32 %r6, %r3, 1, 31, -1;
add.u32 %r3, %r3, %r6;
mov.u32 %r7, %ctaid.x; mov.u32 %r8, %ntid.x; mad.lo.u32 %r9, %r7, %r8, %r1;
mov.u32 %r10, %ctaid.y; mov.u32 %r11, %nctaid.x; mul.lo.u32 %r11, %r11, %r8; mad.lo.u32 %r9, %r10, %r11, %r9;
mul.wide.u32 %rd1, %r9, 4; add.u64 %rd1, %rd1, %rd0;
add.u32 %r3, %r3, %r9;
st.global.u32 [%rd1], %r3;
ret;
}
";

fn diverge_expect(t: u32) -> u32 {
    let v = |l: u32| {
        let s = l * (l % 7 + 1);
        match l % 4 {
            0 => s + 1000,
            1 => s << 1,
            _ => s * 3,
        }
    };
    v(t) + v(t ^ 1)
}

fn run_diverge(sim: &Sim) -> lathe_sim::Counters {
    let m = sim.load_module(&format!("{HEADER}{DIVERGE}")).unwrap();
    let n = 3 * 2 * 64;
    let out = poisoned(sim, n);
    let c = sim
        .launch(
            &m,
            "k",
            &Launch {
                grid: (3, 2, 1),
                block: (64, 1, 1),
                params: vec![Param::U64(out)],
                ..Launch::default()
            },
        )
        .unwrap();
    let got = download_u32(sim, out, n);
    for (g, v) in got.iter().enumerate() {
        let t = (g % 64) as u32;
        assert_eq!(*v, diverge_expect(t).wrapping_add(g as u32), "thread {g}");
    }
    c
}

#[test]
fn divergent_loops_and_branches_reconverge() {
    let c = run_diverge(&sim());
    assert_eq!(c.blocks, 6);
    assert_eq!(c.threads_per_block, 64);
    assert_eq!(c.global_store_requests, 12);
    // Coalesced 4-byte stores: 4 sectors per warp.
    assert_eq!(c.global_store_sectors, 48);
}

#[test]
fn parallel_blocks_count_the_same() {
    let serial = run_diverge(&sim());
    let parallel = run_diverge(&Sim::new(SimConfig::default()));
    assert_eq!(serial, parallel);
}

#[test]
fn atomics_and_reductions() {
    let sim = sim();
    let src = format!(
        "{HEADER}.visible .entry k(.param .u64 out)
{{
.reg .b32 %r<8>;
.reg .f32 %f<4>;
.reg .b64 %rd<4>;
ld.param.u64 %rd0, [out];
mov.u32 %r1, %tid.x;
atom.global.add.u32 %r2, [%rd0], 1;
red.global.add.u32 [%rd0+4], %r1;
atom.global.max.s32 %r3, [%rd0+8], %r1;
cvt.rn.f32.u32 %f0, %r1;
red.global.add.f32 [%rd0+12], %f0;
atom.global.exch.b32 %r4, [%rd0+16], %r1;
atom.global.cas.b32 %r5, [%rd0+20], 0, 7;
ret;
}}
"
    );
    let m = sim.load_module(&src).unwrap();
    let out = upload_u32(&sim, &[0; 6]);
    let c = sim
        .launch(
            &m,
            "k",
            &Launch {
                grid: (2, 1, 1),
                block: (64, 1, 1),
                params: vec![Param::U64(out)],
                ..Launch::default()
            },
        )
        .unwrap();
    let got = download_u32(&sim, out, 6);
    assert_eq!(got[0], 128);
    assert_eq!(got[1], 2 * (0..64).sum::<u32>());
    assert_eq!(got[2], 63);
    assert_eq!(f32::from_bits(got[3]), 2.0 * (0..64).sum::<u32>() as f32);
    assert!(got[4] < 64);
    assert_eq!(got[5], 7);
    assert_eq!(c.global_atomics, 6 * 128);
}

#[test]
fn device_memory_rules() {
    let sim = Sim::new(SimConfig {
        memory_bytes: 4096,
        ..SimConfig::default()
    });
    let a = sim.alloc(100).unwrap();
    let b = sim.alloc(100).unwrap();
    assert_eq!(a % 256, 0);
    assert_eq!(b % 256, 0);
    assert_ne!(a, b);
    assert_eq!(sim.mem_info(), (4096 - 512, 4096));
    assert_eq!(sim.alloc(8192).unwrap_err().kind, ErrorKind::OutOfMemory);
    assert_eq!(
        sim.write(a + 90, &[1; 20]).unwrap_err().kind,
        ErrorKind::BadAddress
    );
    sim.write(a, &[1, 2, 3, 4, 5]).unwrap();
    sim.fill(a + 5, 3, 9).unwrap();
    sim.copy(b + 1, a, 8).unwrap();
    let mut r = [0u8; 9];
    sim.read(b, &mut r).unwrap();
    assert_eq!(&r[1..], &[1, 2, 3, 4, 5, 9, 9, 9]);
    sim.free(a).unwrap();
    assert_eq!(sim.free(a).unwrap_err().kind, ErrorKind::BadAddress);
    // Addresses are never reused.
    let c = sim.alloc(100).unwrap();
    assert!(c > b);
    let mut one = [0u8; 1];
    assert_eq!(
        sim.read(a, &mut one).unwrap_err().kind,
        ErrorKind::BadAddress
    );
}

/// Producer/consumer on a named barrier: warp 0 writes shared memory and arrives, warp 1
/// waits and reads. Without the barrier the read is a race.
#[test]
fn named_barrier_arrive_orders_producer_before_consumer() {
    let body = |sync: &str| {
        format!(
            "{HEADER}.visible .entry k(.param .u64 out)
{{
.reg .b32 %r<8>;
.reg .b64 %rd<4>;
.reg .pred %p<2>;
.shared .align 4 .b32 buf[32];
ld.param.u64 %rd0, [out];
mov.u32 %r1, %tid.x; and.b32 %r2, %r1, 31; shl.b32 %r3, %r2, 2; mov.u32 %r4, buf; add.u32 %r3, %r3, %r4;
setp.ge.u32 %p0, %r1, 32;
@%p0 bra CONSUMER;
mul.lo.u32 %r5, %r2, 3;
st.shared.u32 [%r3], %r5;
{}
ret;
CONSUMER:
{}
ld.shared.u32 %r5, [%r3];
mul.wide.u32 %rd1, %r2, 4; add.u64 %rd1, %rd1, %rd0;
st.global.u32 [%rd1], %r5;
ret;
}}
",
            if sync.is_empty() { "" } else { "bar.arrive 1, 64;" },
            sync
        )
    };
    let sim = sim();
    let out = poisoned(&sim, 32);
    let go = |src: String| {
        let m = sim.load_module(&src).unwrap();
        sim.launch(
            &m,
            "k",
            &Launch {
                grid: (1, 1, 1),
                block: (64, 1, 1),
                params: vec![Param::U64(out)],
                ..Launch::default()
            },
        )
    };
    let e = go(body("")).unwrap_err();
    assert_eq!(e.kind, ErrorKind::SharedRace, "{e}");
    go(body("bar.sync 1, 64;")).expect("ordered by the named barrier");
    let got = download_u32(&sim, out, 32);
    assert_eq!(got, (0..32).map(|i| 3 * i).collect::<Vec<u32>>());
}

/// Shared-memory bank conflicts: lanes reading words `stride` apart.
#[test]
fn bank_conflict_counts() {
    let sim = sim();
    let src = |stride: u32, vec: &str, bytes: u32| {
        format!(
            "{HEADER}.visible .entry k(.param .u64 out)
{{
.reg .b32 %r<8>;
.reg .f32 %f<4>;
.shared .align 16 .b8 buf[16384];
mov.u32 %r1, %tid.x; mul.lo.u32 %r2, %r1, {}; mov.u32 %r3, buf; add.u32 %r2, %r2, %r3;
mov.f32 %f0, 0f3F800000; mov.f32 %f1, 0f3F800000; mov.f32 %f2, 0f3F800000; mov.f32 %f3, 0f3F800000;
st.shared{vec} [%r2], {};
ret;
}}
",
            stride * 4,
            if bytes == 16 {
                "{%f0, %f1, %f2, %f3}"
            } else if bytes == 8 {
                "{%f0, %f1}"
            } else {
                "%f0"
            }
        )
    };
    let conflicts = |stride: u32, vec: &str, bytes: u32| {
        let m = sim.load_module(&src(stride, vec, bytes)).unwrap();
        sim.launch(
            &m,
            "k",
            &Launch {
                grid: (1, 1, 1),
                block: (32, 1, 1),
                params: vec![Param::U64(0)],
                ..Launch::default()
            },
        )
        .unwrap()
        .shared_bank_conflicts
    };
    assert_eq!(conflicts(1, ".f32", 4), 0);
    assert_eq!(conflicts(2, ".f32", 4), 1);
    assert_eq!(conflicts(32, ".f32", 4), 31);
    assert_eq!(conflicts(33, ".f32", 4), 0);
    // 8-byte accesses: two phases of 16 lanes, conflict-free when contiguous.
    assert_eq!(conflicts(2, ".v2.f32", 8), 0);
    assert_eq!(conflicts(4, ".v2.f32", 8), 2);
    // 16-byte accesses: four phases of 8 lanes.
    assert_eq!(conflicts(4, ".v4.f32", 16), 0);
    assert_eq!(conflicts(8, ".v4.f32", 16), 4);
}

/// `cp.async.wait_group 1` completes all but the newest group: the newest group's bytes are
/// still outstanding.
#[test]
fn cp_async_wait_group_keeps_the_newest_groups_pending() {
    let sim = sim();
    let a = upload_f32(&sim, &[2.0; 256]);
    let src = |read_second: bool| {
        format!(
            "{HEADER}.visible .entry k(.param .u64 pa)
{{
.reg .b32 %r<8>;
.reg .b64 %rd<4>;
.reg .f32 %f<4>;
.shared .align 16 .b8 buf[1024];
ld.param.u64 %rd0, [pa];
mov.u32 %r1, %tid.x; shl.b32 %r2, %r1, 4; mov.u32 %r3, buf; add.u32 %r2, %r2, %r3;
mul.wide.u32 %rd1, %r1, 16; add.u64 %rd1, %rd1, %rd0;
cp.async.ca.shared.global [%r2], [%rd1], 16;
cp.async.commit_group;
cp.async.ca.shared.global [%r2+512], [%rd1+512], 16, 8;
cp.async.commit_group;
cp.async.wait_group 1;
ld.shared.f32 %f0, [%r2{}];
ret;
}}
",
            if read_second { "+512" } else { "" }
        )
    };
    let go = |s: String| {
        let m = sim.load_module(&s).unwrap();
        sim.launch(
            &m,
            "k",
            &Launch {
                grid: (1, 1, 1),
                block: (32, 1, 1),
                params: vec![Param::U64(a)],
                ..Launch::default()
            },
        )
    };
    let c = go(src(false)).expect("the first group is complete");
    assert_eq!(c.cp_async_bytes, 32 * 32);
    let e = go(src(true)).unwrap_err();
    assert_eq!(e.kind, ErrorKind::SharedRace, "{e}");
    assert_eq!(e.site.unwrap().line, 18);
}
