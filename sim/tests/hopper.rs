//! The engine side of sm_90a instructions: decoding of Lathe's Hopper GEMM, warpgroup
//! rendezvous of `wgmma.mma_async`, and `setmaxnreg` budgets. The tensor-map, descriptor and
//! product functions plug in behind the engine's hooks.

mod common;
use common::*;
use lathe_sim::{ErrorKind, Launch, Param};

#[test]
fn hopper_gemm_module_decodes() {
    let m = sim()
        .load_module(include_str!("data/hgemm_v2.ptx"))
        .expect("hgemm_v2 decodes");
    assert!(
        m.entries()
            .iter()
            .any(|e| e == "lathe_hgemm_tn_bf16_f32_v2")
    );
}

fn module(body: &str) -> String {
    format!(
        ".version 8.0
.target sm_90a
.address_size 64
.visible .entry k(.param .u64 pa)
{{
.reg .b32 %r<8>;
.reg .b64 %rd<8>;
.reg .f32 %d<4>;
.reg .pred %p<4>;
mov.u32 %r1, %tid.x; mov.u64 %rd1, 0; setp.eq.u32 %p1, %r1, 0;
{body}
}}
"
    )
}

fn launch(body: &str, threads: u32) -> Result<lathe_sim::Counters, lathe_sim::SimError> {
    let sim = sim();
    let m = sim.load_module(&module(body)).expect("load");
    sim.launch(
        &m,
        "k",
        &Launch {
            grid: (1, 1, 1),
            block: (threads, 1, 1),
            params: vec![Param::U64(0)],
            ..Launch::default()
        },
    )
}

const WGMMA: &str = "wgmma.fence.sync.aligned;
wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 {%d0, %d1, %d2, %d3}, %rd1, %rd1, %p1, 1, 1, 0, 0;
wgmma.commit_group.sync.aligned;
wgmma.wait_group.sync.aligned 0;";

#[test]
fn wgmma_needs_the_whole_warpgroup() {
    // Warp 3 leaves before the wgmma: warps 0..2 wait for it forever.
    let body = format!("setp.ge.u32 %p2, %r1, 96;\n@%p2 ret;\n{WGMMA}\nret;");
    let e = launch(&body, 128).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Deadlock, "{e}");
    assert!(e.message.contains("warpgroup 0"), "{e}");
    // A block smaller than a warpgroup cannot run it at all.
    let e = launch(&format!("{WGMMA}\nret;"), 64).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Barrier, "{e}");
    assert_eq!(e.site.unwrap().line, 12);
}

#[test]
fn setmaxnreg_budgets() {
    launch(
        "setp.lt.u32 %p2, %r1, 128;
@%p2 bra P;
setmaxnreg.inc.sync.aligned.u32 232;
ret;
P:
setmaxnreg.dec.sync.aligned.u32 40;
ret;",
        256,
    )
    .expect("producer 40, consumer 232");
    let e = launch(
        "setmaxnreg.dec.sync.aligned.u32 40;\nsetmaxnreg.inc.sync.aligned.u32 32;\nret;",
        128,
    )
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::RegisterBudget, "{e}");
    assert_eq!(e.site.unwrap().line, 12);
}
