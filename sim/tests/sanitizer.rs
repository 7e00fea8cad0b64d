//! Each sanitizer finding on a small kernel that triggers it (kind, thread, PTX line, address),
//! and the same kernel fixed running clean.

mod common;
use common::*;
use lathe_sim::{ErrorKind, Launch, Param, Region, Sim, SimConfig, SimError};

/// A module with one entry `k(pa, pb, n)`; `body` starts on PTX line 12.
fn module(body: &str) -> String {
    format!(
        ".version 8.0
.target sm_80
.address_size 64
.visible .entry k(.param .u64 pa, .param .u64 pb, .param .u32 n)
{{
.reg .b32 %r<16>;
.reg .b64 %rd<16>;
.reg .f32 %f<8>;
.reg .pred %p<8>;
.shared .align 16 .b8 sm[1024];
ld.param.u64 %rd0, [pa]; ld.param.u64 %rd1, [pb]; ld.param.u32 %r0, [n]; mov.u32 %r1, %tid.x;
{body}
}}
"
    )
}

const BODY_LINE: u32 = 12;

fn run(
    sim: &Sim,
    body: &str,
    threads: u32,
    pa: u64,
    pb: u64,
    n: u32,
    regions: Vec<Region>,
) -> Result<lathe_sim::Counters, SimError> {
    let m = sim.load_module(&module(body)).expect("load");
    sim.launch(
        &m,
        "k",
        &Launch {
            grid: (1, 1, 1),
            block: (threads, 1, 1),
            shared_bytes: 0,
            params: vec![Param::U64(pa), Param::U64(pb), Param::U32(n)],
            regions,
        },
    )
}

fn site(e: &SimError) -> (u32, (u32, u32, u32), Option<u64>) {
    let s = e.site.as_ref().expect("site");
    assert_eq!(s.kernel, "k");
    (s.line, s.thread, s.addr)
}

/// out[tid] = in[tid] for every thread: reads past `n` elements unless guarded.
const COPY: &str = "mul.wide.u32 %rd2, %r1, 4; add.u64 %rd3, %rd0, %rd2; add.u64 %rd4, %rd1, %rd2;
ld.global.f32 %f0, [%rd3];
st.global.f32 [%rd4], %f0;
ret;";

const COPY_GUARDED: &str = "setp.ge.u32 %p0, %r1, %r0; @%p0 ret;
mul.wide.u32 %rd2, %r1, 4; add.u64 %rd3, %rd0, %rd2; add.u64 %rd4, %rd1, %rd2;
ld.global.f32 %f0, [%rd3];
st.global.f32 [%rd4], %f0;
ret;";

#[test]
fn out_of_bounds_global_then_fixed_then_device_still_usable() {
    let sim = sim();
    let a = upload_f32(&sim, &[1.5; 16]);
    let b = poisoned(&sim, 32);
    let e = run(&sim, COPY, 32, a, b, 16, vec![]).unwrap_err();
    assert_eq!(e.kind, ErrorKind::OutOfBounds, "{e}");
    assert_eq!(site(&e), (BODY_LINE + 1, (16, 0, 0), Some(a + 64)));
    assert!(e.site.as_ref().unwrap().text.starts_with("ld.global.f32"));
    // The same device runs the fixed kernel.
    run(&sim, COPY_GUARDED, 32, a, b, 16, vec![]).expect("fixed kernel");
    assert_eq!(download_f32(&sim, b, 16), vec![1.5; 16]);
}

#[test]
fn regions_bound_accesses_and_stores() {
    let sim = sim();
    let a = upload_f32(&sim, &[2.0; 64]);
    let b = poisoned(&sim, 64);
    let ra = Region {
        addr: a,
        bytes: 32 * 4,
        writable: false,
    };
    let rb = Region {
        addr: b,
        bytes: 32 * 4,
        writable: true,
    };
    // 33 threads: thread 32 reads inside the allocation but outside the region.
    let e = run(&sim, COPY, 33, a, b, 64, vec![ra, rb]).unwrap_err();
    assert_eq!(e.kind, ErrorKind::OutOfBounds, "{e}");
    assert_eq!(site(&e), (BODY_LINE + 1, (32, 0, 0), Some(a + 128)));
    // Storing into the read-only region.
    let e = run(&sim, COPY, 32, a, a, 64, vec![ra]).unwrap_err();
    assert_eq!(e.kind, ErrorKind::ReadOnly, "{e}");
    assert_eq!(site(&e), (BODY_LINE + 2, (0, 0, 0), Some(a)));
    run(&sim, COPY, 32, a, b, 64, vec![ra, rb]).expect("inside the regions");
}

#[test]
fn misaligned_global_load() {
    let sim = sim();
    let a = upload_f32(&sim, &[1.0; 64]);
    let b = poisoned(&sim, 64);
    let body = "add.u64 %rd0, %rd0, 2;\n".to_string() + COPY;
    let e = run(&sim, &body, 32, a, b, 64, vec![]).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Misaligned, "{e}");
    assert_eq!(site(&e), (BODY_LINE + 2, (0, 0, 0), Some(a + 2)));
    run(&sim, COPY, 32, a, b, 64, vec![]).expect("aligned");
}

#[test]
fn uninitialized_global_read() {
    let sim = sim();
    let a = sim.alloc(128).unwrap();
    let b = poisoned(&sim, 32);
    // Thread 7's element is the only one never written.
    let mut init = [0u8; 128];
    init[..28].fill(1);
    sim.write(a, &init[..28]).unwrap();
    sim.write(a + 32, &init[32..]).unwrap();
    let e = run(&sim, COPY, 32, a, b, 32, vec![]).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Uninitialized, "{e}");
    assert_eq!(site(&e), (BODY_LINE + 1, (7, 0, 0), Some(a + 28)));
    sim.write(a + 28, &[0; 4]).unwrap();
    run(&sim, COPY, 32, a, b, 32, vec![]).expect("written");
}

/// Thread t writes word t of `sm`, then reads word t % 32 (for warp 1: a word of warp 0).
fn exchange(sync: &str) -> String {
    format!(
        "shl.b32 %r2, %r1, 2; cvt.rn.f32.u32 %f0, %r1; mov.u32 %r5, sm; add.u32 %r2, %r2, %r5;
st.shared.f32 [%r2], %f0;
{sync}
and.b32 %r3, %r1, 31; shl.b32 %r3, %r3, 2; add.u32 %r3, %r3, %r5;
ld.shared.f32 %f1, [%r3];
mul.wide.u32 %rd2, %r1, 4; add.u64 %rd4, %rd1, %rd2;
st.global.f32 [%rd4], %f1;
ret;"
    )
}

#[test]
fn shared_race_without_barrier_and_clean_with_one() {
    let sim = sim();
    let b = poisoned(&sim, 64);
    let e = run(&sim, &exchange(""), 64, b, b, 0, vec![]).unwrap_err();
    assert_eq!(e.kind, ErrorKind::SharedRace, "{e}");
    // Warps run in order until they wait: warp 1 reads what warp 0 wrote, unordered.
    assert_eq!(site(&e), (BODY_LINE + 4, (32, 0, 0), Some(0)));
    let c = run(&sim, &exchange("bar.sync 0;"), 64, b, b, 0, vec![]).expect("with a barrier");
    let out = download_f32(&sim, b, 64);
    for (t, v) in out.iter().enumerate() {
        assert_eq!(*v, (t % 32) as f32);
    }
    assert_eq!(c.shared_bank_conflicts, 0);
    assert_eq!(c.shared_store_requests, 2);
    assert_eq!(c.shared_load_requests, 2);
}

#[test]
fn uninitialized_and_out_of_bounds_shared() {
    let sim = sim();
    let b = poisoned(&sim, 64);
    // Only thread 0..31 write; warp 1 reads its own (never written) words... but first warp 0
    // reads words of warp 1 that nothing wrote yet.
    let body = "shl.b32 %r2, %r1, 2; cvt.rn.f32.u32 %f0, %r1;
setp.lt.u32 %p0, %r1, 32;
@%p0 st.shared.f32 [%r2], %f0;
bar.sync 0;
xor.b32 %r3, %r1, 32; shl.b32 %r3, %r3, 2;
ld.shared.f32 %f1, [%r3];
ret;";
    let e = run(&sim, body, 64, b, b, 0, vec![]).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Uninitialized, "{e}");
    assert_eq!(site(&e), (BODY_LINE + 5, (0, 0, 0), Some(128)));
    let body = "shl.b32 %r2, %r1, 5; st.shared.f32 [%r2], %f1;\nret;";
    let e = run(&sim, body, 64, b, b, 0, vec![]).unwrap_err();
    assert_eq!(e.kind, ErrorKind::OutOfBounds, "{e}");
    assert_eq!(site(&e), (BODY_LINE, (32, 0, 0), Some(1024)));
}

#[test]
fn divergent_and_partial_barriers() {
    let sim = sim();
    let b = poisoned(&sim, 64);
    // Half of warp 0 skips the barrier.
    let body = "setp.lt.u32 %p0, %r1, 16;
@%p0 bra L;
bar.sync 0;
L:
ret;";
    let e = run(&sim, body, 32, b, b, 0, vec![]).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Barrier, "{e}");
    assert_eq!(site(&e).0, BODY_LINE + 2);
    // Warp 1 exits; warp 0 waits at a block-wide barrier forever.
    let body = "setp.ge.u32 %p0, %r1, 32;
@%p0 ret;
bar.sync 0;
ret;";
    let e = run(&sim, body, 64, b, b, 0, vec![]).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Barrier, "{e}");
    // With a thread count naming only warp 0, the barrier completes.
    let body = "setp.ge.u32 %p0, %r1, 32;
@%p0 ret;
bar.sync 1, 32;
ret;";
    run(&sim, body, 64, b, b, 0, vec![]).expect("named barrier of one warp");
}

#[test]
fn mbarrier_phase_that_never_completes_is_a_deadlock() {
    let sim = sim();
    let b = poisoned(&sim, 64);
    let wait = |count: u32| {
        format!(
            "mov.u32 %r2, sm;
setp.eq.u32 %p0, %r1, 0;
@%p0 mbarrier.init.shared::cta.b64 [%r2], {count};
bar.sync 0;
mbarrier.arrive.shared::cta.b64 _, [%r2];
W:
mbarrier.try_wait.parity.shared::cta.b64 %p1, [%r2], 0;
@!%p1 bra W;
ret;"
        )
    };
    // 64 arrivals expected, 32 threads arrive.
    let e = run(&sim, &wait(64), 32, b, b, 0, vec![]).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Deadlock, "{e}");
    assert_eq!(site(&e).0, BODY_LINE + 6);
    assert!(e.message.contains("mbarrier"), "{}", e.message);
    run(&sim, &wait(32), 32, b, b, 0, vec![]).expect("every thread arrives");
}

/// A consumer warp polling `mbarrier.test_wait` lets the producer warp run: warp 1 releases
/// the barrier, so it runs on into its polling loop before warp 0 has arrived.
#[test]
fn test_wait_polling_yields_to_other_warps() {
    let sim = sim();
    let b = poisoned(&sim, 64);
    let body = "mov.u32 %r2, sm;
setp.eq.u32 %p0, %r1, 0;
@%p0 mbarrier.init.shared::cta.b64 [%r2], 32;
bar.sync 0;
setp.lt.u32 %p0, %r1, 32;
@%p0 bra PRODUCER;
W:
mbarrier.test_wait.parity.shared::cta.b64 %p1, [%r2], 0;
@!%p1 bra W;
ret;
PRODUCER:
mbarrier.arrive.shared::cta.b64 _, [%r2];
ret;";
    run(&sim, body, 64, b, b, 0, vec![]).expect("the poll ends once warp 0 arrives");
}

#[test]
fn endless_loop_and_trap_are_trap_errors() {
    let sim = Sim::new(SimConfig {
        instruction_budget: 10_000,
        ..SimConfig::default()
    });
    let b = poisoned(&sim, 64);
    let e = run(&sim, "L:\nbra L;", 32, b, b, 0, vec![]).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Trap, "{e}");
    assert_eq!(site(&e).0, BODY_LINE + 1);
    let e = run(
        &sim,
        "setp.eq.u32 %p0, %r1, 5;\n@%p0 trap;\nret;",
        32,
        b,
        b,
        0,
        vec![],
    )
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Trap, "{e}");
    assert_eq!(site(&e), (BODY_LINE + 1, (5, 0, 0), None));
    run(&sim, "ret;", 32, b, b, 0, vec![]).expect("a kernel that returns");
}

#[test]
fn cp_async_destination_read_before_wait() {
    let sim = sim();
    let a = upload_f32(&sim, &[3.0; 128]);
    let b = poisoned(&sim, 128);
    let body = |wait: &str| {
        format!(
            "shl.b32 %r2, %r1, 4; mov.u32 %r3, sm; add.u32 %r3, %r3, %r2;
mul.wide.u32 %rd2, %r1, 16; add.u64 %rd3, %rd0, %rd2; add.u64 %rd4, %rd1, %rd2;
cp.async.cg.shared.global [%r3], [%rd3], 16;
cp.async.commit_group;
{wait}
ld.shared.v4.f32 {{%f0, %f1, %f2, %f3}}, [%r3];
st.global.v4.f32 [%rd4], {{%f0, %f1, %f2, %f3}};
ret;"
        )
    };
    let e = run(&sim, &body(""), 32, a, b, 0, vec![]).unwrap_err();
    assert_eq!(e.kind, ErrorKind::SharedRace, "{e}");
    assert_eq!(site(&e), (BODY_LINE + 5, (0, 0, 0), Some(0)));
    let c = run(&sim, &body("cp.async.wait_group 0;"), 32, a, b, 0, vec![]).expect("waited");
    assert_eq!(download_f32(&sim, b, 128), vec![3.0; 128]);
    assert_eq!(c.cp_async_bytes, 512);
}

#[test]
fn malformed_ptx_and_unknown_instructions_name_the_line() {
    let sim = sim();
    let e = sim
        .load_module(&module("add.u32 %r2, %r1;\nret;"))
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Parse, "{e}");
    assert!(e.message.contains(&format!("line {BODY_LINE}")), "{e}");
    let e = sim
        .load_module(&module("ret;\nfrobnicate.u32 %r2, %r1;"))
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unsupported, "{e}");
    assert!(
        e.message.contains(&format!("line {}", BODY_LINE + 1)),
        "{e}"
    );
    let e = sim
        .load_module(&module("add.rz.f32 %f0, %f1, %f2;"))
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unsupported, "{e}");
    let e = sim.load_module(&module("mov.u32 %r2, %nope;")).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Parse, "{e}");
    let e = sim.load_module(&module("bra NOWHERE;")).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Parse, "{e}");
    let e = sim
        .load_module(".version 8.0\n.entry k(\n{\nret;\n}")
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Parse, "{e}");
}

#[test]
fn bad_launches() {
    let sim = sim();
    let m = sim.load_module(&module("ret;")).unwrap();
    let l = |block, params| Launch {
        grid: (1, 1, 1),
        block,
        params,
        ..Launch::default()
    };
    let p = vec![Param::U64(0), Param::U64(0), Param::U32(0)];
    assert_eq!(
        sim.launch(&m, "k", &l((2048, 1, 1), p.clone()))
            .unwrap_err()
            .kind,
        ErrorKind::BadLaunch
    );
    assert_eq!(
        sim.launch(&m, "k", &l((32, 1, 1), vec![]))
            .unwrap_err()
            .kind,
        ErrorKind::BadLaunch
    );
    assert_eq!(
        sim.launch(&m, "nope", &l((32, 1, 1), p.clone()))
            .unwrap_err()
            .kind,
        ErrorKind::BadLaunch
    );
    sim.launch(&m, "k", &l((32, 1, 1), p)).expect("good launch");
}

/// Truncated and corrupted PTX never panics the loader: every variant loads or is an error.
#[test]
fn mangled_ptx_is_an_error_not_a_panic() {
    let sim = sim();
    let src = include_str!("data/reduce.ptx");
    let mut rng = Rng::new(99);
    let bytes = src.as_bytes();
    for cut in (0..bytes.len()).step_by(97) {
        let _ = sim.load_module(&String::from_utf8_lossy(&bytes[..cut]));
    }
    let junk = b"{}[]()<>;,.%@!|+-0x0f0d_:9 ";
    for _ in 0..2000 {
        let mut b = bytes.to_vec();
        for _ in 0..4 {
            let i = (rng.u32() as usize) % b.len();
            b[i] = junk[(rng.u32() as usize) % junk.len()];
        }
        if let Ok(m) = sim.load_module(&String::from_utf8_lossy(&b)) {
            // Whatever still decodes must launch or fail cleanly.
            for e in m.entries() {
                let x = upload_f32(&sim, &[1.0; 64]);
                let out = poisoned(&sim, 64);
                let _ = sim.launch(
                    &m,
                    e,
                    &Launch {
                        grid: (2, 1, 1),
                        block: (64, 1, 1),
                        params: vec![Param::U64(x), Param::U64(64), Param::U64(out)],
                        ..Launch::default()
                    },
                );
            }
        }
    }
    // The device still works.
    let a = upload_f32(&sim, &[1.5; 16]);
    let b = poisoned(&sim, 32);
    run(&sim, COPY_GUARDED, 32, a, b, 16, vec![]).expect("a good launch after all that");
}

/// Two threads read a word, then one of them writes it with no barrier: the write races with
/// the other thread's read even though the writer read last.
#[test]
fn write_after_two_readers_races() {
    let sim = sim();
    let b = poisoned(&sim, 64);
    let body = |sync: &str| {
        format!(
            "mov.u32 %r5, sm; setp.eq.u32 %p1, %r1, 0;
@%p1 st.shared.u32 [%r5], 7;
bar.sync 0;
setp.eq.u32 %p2, %r1, 33;
setp.eq.u32 %p3, %r1, 32;
or.pred %p2, %p2, %p3;
@%p2 ld.shared.u32 %r6, [%r5];
{sync}
setp.eq.u32 %p4, %r1, 33;
@%p4 st.shared.u32 [%r5], %r1;
ret;"
        )
    };
    let e = run(&sim, &body(""), 64, b, b, 0, vec![]).unwrap_err();
    assert_eq!(e.kind, ErrorKind::SharedRace, "{e}");
    assert_eq!(site(&e), (BODY_LINE + 9, (33, 0, 0), Some(0)));
    assert!(e.message.contains("thread 32"), "{e}");
    run(&sim, &body("bar.sync 0;"), 64, b, b, 0, vec![]).expect("ordered");
}
