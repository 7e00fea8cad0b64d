//! `lathe bench gemm|adamw|attention`: the kernels the device step spends its time in, one
//! problem at a time.
//!
//! On a GPU (`--device cuda[:N]`): the median time of `--iters` launches timed with CUDA events
//! after a warm-up, and the rate (TFLOP/s for products, GB/s for AdamW). On the simulated
//! device (`--device sim`): no time (the simulator has no timing model) but what each launch
//! did, next to the problem's napkin math — tensor-core FLOPs against `2 M N K`, global bytes
//! against the bytes the problem must move, 32-byte sectors per request (4 is a perfectly
//! coalesced 4-byte-per-lane warp access, 8 and 16 for 8 and 16 bytes per lane), shared-memory bank
//! conflicts (extra wavefronts; 0 for a conflict-free kernel) and warp instructions per
//! thousand tensor-core FLOPs: an efficiency report a kernel author can act on without a GPU.
//!
//! The products are the three of a linear layer in training, as the device step launches
//! them: forward `Y = X W^T`, input gradient `dX = dY W`, weight gradient `dW += dY^T X` (f32,
//! beta = 1). Attention is measured twice, forward and backward: the fused kernels the device
//! step uses (`lathe_kernels::nn::flash`: no T x T matrix, the log-sum-exp saved) and the
//! materialised reference path (batched products around the masked softmax kernels, through
//! the tape) for comparison.
//!
//! On a GPU the peers run in the same process on the same device, timed the same way (median
//! of `--iters` event-timed runs after a warm-up), and each line gives Lathe's time over the
//! peer's: cuBLASLt (loaded at run time) on the same buffers for the GEMMs; PyTorch's fused
//! AdamW and causal `scaled_dot_product_attention` through `python3` when it has torch with
//! CUDA, else, for AdamW, a device copy of the same bytes (the bandwidth ceiling). A peer that
//! cannot run is named with the reason; nothing is compared on the simulator.

use crate::config::DeviceSpec;
use anyhow::{Context, Result, bail};
use half::bf16;
use lathe_autograd::{AttentionPath, DType, Tape, Tensor};
use lathe_host::gemm_ops::{Gemm, Op};
use lathe_host::nn_ops::{AdamWLaunch, FlashShape, WorkingCopyMut};
use lathe_host::peer::cublaslt::{Peer, Plan};
use lathe_host::timing::KernelTiming;
use lathe_host::{Device, DeviceBuffer};
use lathe_kernels::Elem;
use lathe_kernels::nn::adamw::DecayRanges;
use lathe_kernels::nn::amp::StepState;
use lathe_kernels::rng::Rng;

/// Which kernel family to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelBench {
    Gemm,
    Adamw,
    Attention,
}

fn open(spec: DeviceSpec) -> Result<Device> {
    match spec {
        DeviceSpec::Sim => Device::sim().context("--device sim"),
        DeviceSpec::Cuda(n) => Device::cuda(n).with_context(|| format!("--device cuda:{n}")),
        DeviceSpec::Auto => match Device::cuda(0) {
            Ok(d) => Ok(d),
            Err(_) => Device::sim().context("no usable GPU; the simulated device"),
        },
        DeviceSpec::Cpu => bail!("kernel benchmarks run on a device: --device cuda or sim"),
    }
}

fn random_bf16(rng: &mut Rng, n: usize) -> Vec<bf16> {
    (0..n)
        .map(|_| bf16::from_f32(rng.range_f32(-1.0, 1.0)))
        .collect()
}

fn random_f32(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.range_f32(-1.0, 1.0) * scale).collect()
}

/// Parses `a,b,c` (or `axbxc`) into `want` positive numbers.
fn parse_shape(s: &str, want: usize, what: &str) -> Result<Vec<usize>> {
    let v: Vec<usize> = s
        .split([',', 'x'])
        .map(|p| p.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("--shape {s:?}: {what} are {want} positive integers"))?;
    if v.len() != want || v.contains(&0) {
        bail!("--shape {s:?}: {what} are {want} positive integers");
    }
    Ok(v)
}

/// Runs `f` with kernel timing on: on a GPU `iters` times after one warm-up, returning the
/// launches of the timed runs; on the simulator once.
fn measured(
    dev: &Device,
    iters: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<(Vec<KernelTiming>, usize)> {
    let runs = if dev.is_sim() { 1 } else { iters.max(1) };
    if !dev.is_sim() {
        f()?;
        dev.synchronize()?;
    }
    dev.enable_kernel_timing()?;
    for _ in 0..runs {
        f()?;
    }
    dev.synchronize()?;
    let t = dev.take_kernel_timings()?;
    dev.disable_kernel_timing();
    Ok((t.map(|t| t.kernels).unwrap_or_default(), runs))
}

/// What a problem must do at least: FLOPs (tensor-core work for products) and bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Napkin {
    pub flops: u64,
    pub bytes: u64,
}

/// What one benchmarked problem did, summed over its launches (simulator counters; zeros on a
/// GPU, where only time is known).
#[derive(Clone, Debug, PartialEq)]
pub struct Measured {
    pub title: String,
    pub napkin: Napkin,
    pub launches: usize,
    pub tensor_flops: u64,
    pub global_bytes: u64,
    pub bank_conflicts: u64,
    /// Median seconds on a GPU (`None` on the simulator).
    pub median_s: Option<f64>,
    /// The peer's median seconds on the same problem in the same run, and its name (`None`
    /// on the simulator or where the peer is unavailable; the reason is printed).
    pub peer: Option<(String, f64)>,
}

fn report(
    dev: &Device,
    title: &str,
    launches: &[KernelTiming],
    runs: usize,
    napkin: &Napkin,
) -> Measured {
    println!("{title}");
    let mut out = Measured {
        title: title.to_string(),
        napkin: *napkin,
        launches: launches.len() / runs.max(1),
        tensor_flops: 0,
        global_bytes: 0,
        bank_conflicts: 0,
        median_s: None,
        peer: None,
    };
    if dev.is_sim() {
        let mut tflops = 0u64;
        let mut gbytes = 0u64;
        let (mut lreq, mut lsec, mut sreq, mut ssec) = (0u64, 0u64, 0u64, 0u64);
        let (mut conflicts, mut warp) = (0u64, 0u64);
        for k in launches {
            let Some(c) = &k.counters else { continue };
            let w = &c.warp_instructions;
            let warp_k = w.total();
            let ratio = |a: u64, b: u64| {
                if b == 0 {
                    "-".to_string()
                } else {
                    format!("{:.2}", a as f64 / b as f64)
                }
            };
            println!(
                "  {:<44} blocks {:>6} x {:>4}  smem {:>6} B  sectors/req load {:>5} store {:>5}  \
                 bank conflicts {:>8}  tensor FLOPs {:>13}",
                k.entry,
                c.blocks,
                c.threads_per_block,
                c.static_shared_bytes + c.dynamic_shared_bytes,
                ratio(c.global_load_sectors, c.global_load_requests),
                ratio(c.global_store_sectors, c.global_store_requests),
                c.shared_bank_conflicts,
                c.tensor_flops
            );
            tflops += c.tensor_flops;
            // TMA copies are global reads the load counters do not see.
            gbytes += c.global_load_bytes + c.global_store_bytes + c.tma_bytes;
            lreq += c.global_load_requests;
            lsec += c.global_load_sectors;
            sreq += c.global_store_requests;
            ssec += c.global_store_sectors;
            conflicts += c.shared_bank_conflicts;
            warp += warp_k;
        }
        let pct = |a: u64, b: u64| {
            if b == 0 {
                "-".into()
            } else {
                format!("{:.1}%", 100.0 * a as f64 / b as f64)
            }
        };
        println!(
            "  total: tensor FLOPs {tflops} ({} of the napkin {}), global bytes {gbytes} ({} of \
             the napkin {}), sectors/request load {:.2} store {:.2}, bank conflicts {conflicts}, \
             warp instructions per 1000 tensor FLOPs {}",
            pct(tflops, napkin.flops),
            napkin.flops,
            pct(gbytes, napkin.bytes),
            napkin.bytes,
            if lreq == 0 {
                0.0
            } else {
                lsec as f64 / lreq as f64
            },
            if sreq == 0 {
                0.0
            } else {
                ssec as f64 / sreq as f64
            },
            if tflops == 0 {
                "-".to_string()
            } else {
                format!("{:.3}", 1000.0 * warp as f64 / tflops as f64)
            }
        );
        out.tensor_flops = tflops;
        out.global_bytes = gbytes;
        out.bank_conflicts = conflicts;
        return out;
    }
    // A GPU: each run's launches add up to one time; the median over runs.
    let per_run = launches.len() / runs.max(1);
    let mut times: Vec<f64> = launches
        .chunks(per_run.max(1))
        .map(|c| c.iter().map(|k| k.dur_ns as f64).sum::<f64>())
        .collect();
    times.sort_by(f64::total_cmp);
    let median_ns = times.get(times.len() / 2).copied().unwrap_or(f64::NAN);
    let s = median_ns * 1e-9;
    println!(
        "  median {:.3} ms over {} runs ({} launches each): {:.1} TFLOP/s, {:.0} GB/s of the \
         napkin traffic",
        s * 1e3,
        times.len(),
        per_run,
        napkin.flops as f64 / s / 1e12,
        napkin.bytes as f64 / s / 1e9
    );
    out.median_s = Some(s);
    out
}

/// `lathe bench gemm|adamw|attention`.
pub fn run(
    kind: KernelBench,
    spec: DeviceSpec,
    shapes: &[String],
    iters: usize,
) -> Result<Vec<Measured>> {
    let dev = open(spec)?;
    println!(
        "{} on {}{}",
        match kind {
            KernelBench::Gemm => "GEMM (bf16 operands)",
            KernelBench::Adamw => "fused AdamW (f32 state, bf16 working copy)",
            KernelBench::Attention => "causal attention (bf16), forward + backward",
        },
        dev.describe(),
        if dev.is_sim() {
            ": what each launch did (the simulator has no timing model)"
        } else {
            ""
        }
    );
    let sim = dev.is_sim();
    let mut rng = Rng::new(7);
    let mut all = Vec::new();
    match kind {
        KernelBench::Gemm => {
            let defaults: &[&str] = if sim {
                &["256,256,256", "130,200,72"]
            } else {
                &[
                    "8192,8192,8192",
                    "16384,2304,768",
                    "16384,3072,768",
                    "16384,768,3072",
                    "16384,50304,768",
                ]
            };
            for s in shapes_or(shapes, defaults) {
                let v = parse_shape(&s, 3, "M, N, K")?;
                all.extend(gemm_layouts(&dev, &mut rng, v[0], v[1], v[2], iters)?);
            }
        }
        KernelBench::Adamw => {
            let defaults: &[&str] = if sim { &["262144"] } else { &["124475904"] };
            for s in shapes_or(shapes, defaults) {
                let n = parse_shape(&s, 1, "the parameter count")?[0];
                all.push(adamw(&dev, &mut rng, n, iters)?);
            }
        }
        KernelBench::Attention => {
            let defaults: &[&str] = if sim {
                &["1,2,64,64"]
            } else {
                &["16,12,1024,64"]
            };
            for s in shapes_or(shapes, defaults) {
                let v = parse_shape(&s, 4, "B, heads, T, head size")?;
                all.push(flash_attention(
                    &dev, &mut rng, v[0], v[1], v[2], v[3], iters,
                )?);
                all.push(attention(&dev, &mut rng, v[0], v[1], v[2], v[3], iters)?);
            }
        }
    }
    Ok(all)
}

fn shapes_or(shapes: &[String], defaults: &[&str]) -> Vec<String> {
    if shapes.is_empty() {
        defaults.iter().map(|s| s.to_string()).collect()
    } else {
        shapes.to_vec()
    }
}

/// The three products of a linear layer with `M` rows, `K` inputs and `N` outputs.
fn gemm_layouts(
    dev: &Device,
    rng: &mut Rng,
    m: usize,
    n: usize,
    k: usize,
    iters: usize,
) -> Result<Vec<Measured>> {
    let x = dev.htod(&random_bf16(rng, m * k))?;
    let w = dev.htod(&random_bf16(rng, n * k))?;
    let dy = dev.htod(&random_bf16(rng, m * n))?;
    let mut y = dev.alloc::<bf16>(m * n)?;
    let mut dx = dev.alloc::<bf16>(m * k)?;
    let mut dw = dev.htod(&random_f32(rng, n * k, 1.0))?;
    let flops = 2 * (m * n * k) as u64;
    let b2 = |e: usize| 2 * e as u64;
    // Y(M,N) = X(M,K) W(N,K)^T
    let g = Gemm::new(m, n, k).with_ops(Op::N, Op::T);
    let mut out = Vec::new();
    let lt = cublaslt_peer(dev);
    let (l, r) = measured(dev, iters, || Ok(dev.gemm(&g, &x, &w, None, &mut y)?))?;
    let mut f = report(
        dev,
        &format!("forward Y = X W^T   M {m} N {n} K {k} (N T, bf16 out)"),
        &l,
        r,
        &Napkin {
            flops,
            bytes: b2(m * k) + b2(n * k) + b2(m * n),
        },
    );
    gemm_peer(
        dev,
        lt.as_ref(),
        &g,
        Elem::BF16,
        [x.addr(), w.addr(), y.addr()],
        iters,
        &mut f,
    );
    out.push(f);
    // dX(M,K) = dY(M,N) W(N,K)
    let g = Gemm::new(m, k, n);
    let (l, r) = measured(dev, iters, || Ok(dev.gemm(&g, &dy, &w, None, &mut dx)?))?;
    let mut f = report(
        dev,
        &format!("input grad dX = dY W   M {m} N {k} K {n} (N N, bf16 out)"),
        &l,
        r,
        &Napkin {
            flops,
            bytes: b2(m * n) + b2(n * k) + b2(m * k),
        },
    );
    gemm_peer(
        dev,
        lt.as_ref(),
        &g,
        Elem::BF16,
        [dy.addr(), w.addr(), dx.addr()],
        iters,
        &mut f,
    );
    out.push(f);
    // dW(N,K) += dY(M,N)^T X(M,K)
    let g = Gemm::new(n, k, m).with_ops(Op::T, Op::N).with_beta(1.0);
    let (l, r) = measured(dev, iters, || Ok(dev.gemm(&g, &dy, &x, None, &mut dw)?))?;
    let mut f = report(
        dev,
        &format!("weight grad dW += dY^T X   M {n} N {k} K {m} (T N, f32 out, beta 1)"),
        &l,
        r,
        &Napkin {
            flops,
            bytes: b2(m * n) + b2(m * k) + 8 * (n * k) as u64,
        },
    );
    gemm_peer(
        dev,
        lt.as_ref(),
        &g,
        Elem::F32,
        [dy.addr(), x.addr(), dw.addr()],
        iters,
        &mut f,
    );
    out.push(f);
    Ok(out)
}

/// cuBLASLt on a GPU, or `None` after printing why not (always `None` on the simulator).
fn cublaslt_peer(dev: &Device) -> Option<Peer> {
    if dev.is_sim() {
        return None;
    }
    match Peer::new(dev) {
        Ok(p) => Some(p),
        Err(e) => {
            println!("  peer cuBLASLt unavailable: {e}");
            None
        }
    }
}

/// Median seconds of `iters` event-timed runs of `f` on the compute stream (after one
/// warm-up): the peers' timing, the same clock as Lathe's kernel timing.
fn time_median(dev: &Device, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let stream = dev.compute_stream();
    f()?;
    let mut v = Vec::with_capacity(iters.max(1));
    for _ in 0..iters.max(1) {
        let start = stream.record()?;
        f()?;
        let end = stream.record()?;
        end.synchronize()?;
        v.push(start.elapsed_ms(&end)? as f64 * 1e-3);
    }
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

/// Prints and records a peer's median next to Lathe's.
fn record_peer(m: &mut Measured, name: &str, secs: f64) {
    let rate = if m.napkin.flops > 0 {
        format!("{:.1} TFLOP/s", m.napkin.flops as f64 / secs / 1e12)
    } else {
        format!(
            "{:.0} GB/s of the napkin traffic",
            m.napkin.bytes as f64 / secs / 1e9
        )
    };
    let ratio = m
        .median_s
        .map(|l| format!(", Lathe / peer time {:.3}", l / secs))
        .unwrap_or_default();
    println!("  peer {name}: median {:.3} ms, {rate}{ratio}", secs * 1e3);
    m.peer = Some((name.to_string(), secs));
}

/// cuBLASLt on the same product and buffers (`addrs`: A, B, C), in the same run.
fn gemm_peer(
    dev: &Device,
    peer: Option<&Peer>,
    g: &Gemm,
    out: Elem,
    addrs: [u64; 3],
    iters: usize,
    m: &mut Measured,
) {
    let Some(peer) = peer else { return };
    let plan = match Plan::new(peer, g, Elem::BF16, out) {
        Ok(p) => p,
        Err(e) => {
            println!("  peer cuBLASLt: no plan: {e}");
            return;
        }
    };
    let [a, b, c] = addrs;
    match time_median(dev, iters, || {
        Ok(plan.run(a, b, c, dev.compute_stream())?)
    }) {
        Ok(secs) => record_peer(m, "cuBLASLt", secs),
        Err(e) => println!("  peer cuBLASLt failed: {e}"),
    }
}

fn adamw(dev: &Device, rng: &mut Rng, n: usize, iters: usize) -> Result<Measured> {
    let mut master: DeviceBuffer<f32> = dev.htod(&random_f32(rng, n, 1.0))?;
    let grads = dev.htod(&random_f32(rng, n, 1e-2))?;
    let mut m = dev.htod(&random_f32(rng, n, 1e-3))?;
    let mut v = dev.htod(
        &random_f32(rng, n, 1e-6)
            .iter()
            .map(|x| x.abs())
            .collect::<Vec<_>>(),
    )?;
    let mut working = dev.alloc::<bf16>(n)?;
    let decay = dev.upload_decay_ranges(
        &DecayRanges::merged(std::iter::once(0..n as u64 / 2))
            .map_err(|e| anyhow::anyhow!("{e}"))?,
    )?;
    let state = dev.step_state(&StepState {
        found_inf: false,
        scale: 1.0,
        inv_scale: 1.0,
        growth_tracker: 0,
        clip: 1.0,
        grad_norm: 0.0,
        step: 10,
        skipped: 0,
        last_found_inf: false,
    })?;
    let p = AdamWLaunch {
        lr: 6e-4,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        offset: 0,
        seed: 0,
        unscale: true,
    };
    let (l, r) = measured(dev, iters, || {
        Ok(dev.adamw_step(
            &mut master,
            &grads,
            &mut m,
            &mut v,
            WorkingCopyMut::Bf16(&mut working),
            &decay,
            &state,
            &p,
        )?)
    })?;
    let mut out = report(
        dev,
        &format!("AdamW over {n} parameters"),
        &l,
        r,
        &Napkin {
            flops: 0,
            // Reads master, grads, m, v; writes master, m, v and the bf16 working copy.
            bytes: (16 + 12 + 2) * n as u64,
        },
    );
    if !dev.is_sim() {
        match torch_peer(&["adamw", &n.to_string(), &iters.max(1).to_string()]) {
            Ok(secs) => record_peer(&mut out, "PyTorch fused AdamW (one flat f32 tensor)", secs),
            Err(e) => {
                println!("  peer PyTorch unavailable ({e}); a device copy of the same bytes:");
                // Half the napkin bytes read, half written.
                let words = out.napkin.bytes as usize / 8;
                let src = dev.alloc::<f32>(words)?;
                let mut dst = dev.alloc::<f32>(words)?;
                let secs = time_median(dev, iters, || Ok(src.copy_to(&mut dst)?))?;
                record_peer(&mut out, "device copy", secs);
            }
        }
    }
    Ok(out)
}

/// The PyTorch side of the AdamW and attention peers, run by `python3` when it has torch and
/// a GPU: prints `{"ms": median}` of CUDA-event-timed runs after a warm-up.
const TORCH_PEER: &str = r#"
import sys, json, torch
import torch.nn.functional as F
def median_ms(fn, iters):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); e.synchronize(); ts.append(s.elapsed_time(e))
    ts.sort()
    return ts[len(ts) // 2]
kind = sys.argv[1]
if kind == "attention":
    b, h, t, d, iters = map(int, sys.argv[2:7])
    q, k, v = [torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    do = torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16)
    def step():
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        o.backward(do)
    ms = median_ms(step, iters)
else:
    n, iters = int(sys.argv[2]), int(sys.argv[3])
    p = torch.nn.Parameter(torch.randn(n, device="cuda"))
    p.grad = torch.randn(n, device="cuda") * 1e-2
    opt = torch.optim.AdamW([p], lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True)
    ms = median_ms(opt.step, iters)
print(json.dumps({"ms": ms, "torch": torch.__version__}))
"#;

/// Runs [`TORCH_PEER`] with `args`; the median in seconds, or why there is no figure.
fn torch_peer(args: &[&str]) -> std::result::Result<f64, String> {
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(TORCH_PEER)
        .args(args)
        .output()
        .map_err(|e| format!("python3: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or("").trim().to_string();
        return Err(format!("python3 with torch: {last}"));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = text
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| format!("unexpected peer output {text:?}"))?;
    v["ms"]
        .as_f64()
        .map(|ms| ms * 1e-3)
        .ok_or_else(|| format!("no median in {text:?}"))
}

/// The fused causal attention: forward, then the backward (row dot, dQ pass, dK/dV pass).
fn flash_attention(
    dev: &Device,
    rng: &mut Rng,
    b: usize,
    h: usize,
    t: usize,
    d: usize,
    iters: usize,
) -> Result<Measured> {
    if let Some(why) = Device::flash_attention_unsupported::<bf16>(d) {
        bail!("--shape: the fused attention kernels do not take {why}");
    }
    let c = h * d;
    let n = b * t * c;
    let s = FlashShape { b, t, nh: h, hs: d };
    let qkv: DeviceBuffer<bf16> = dev.htod(&random_bf16(rng, 3 * n))?;
    let dy: DeviceBuffer<bf16> = dev.htod(&random_bf16(rng, n))?;
    let mut y = dev.alloc::<bf16>(n)?;
    let mut lse = dev.alloc::<f32>(s.stats_len())?;
    let mut dqkv = dev.alloc::<bf16>(3 * n)?;
    let scale = 1.0 / (d as f32).sqrt();
    let (l, r) = measured(dev, iters, || {
        dev.flash_attention_forward(&qkv, &mut y, &mut lse, &s, scale)?;
        dev.flash_attention_backward(&qkv, &y, &lse, &dy, &mut dqkv, &s, scale)?;
        Ok(())
    })?;
    let bhtt = (b * h * t * t) as u64;
    Ok(report(
        dev,
        &format!(
            "fused attention B {b} heads {h} T {t} head size {d}: no T x T matrix, log-sum-exp              {:.2} MiB per layer kept for the backward",
            (4 * s.stats_len()) as f64 / (1u64 << 20) as f64
        ),
        &l,
        r,
        &Napkin {
            // Causal: half of the square. Forward QK^T and PV, backward five products
            // (S, dP, dV, dK, dQ): 7 x 2 B H T^2 d / 2. The kernels recompute S and dP once
            // more for the atomic-free dQ (9 instead of 7) and compute whole diagonal tiles.
            flops: 7 * bhtt * d as u64,
            // bf16: the forward reads q, k, v and writes y; the backward reads dy, q, k, v and
            // y and writes dq, dk, dv (the f32 statistics are B H T).
            bytes: 22 * (b * t * c) as u64,
        },
    ))
    .map(|mut out| {
        if !dev.is_sim() {
            let a = [b, h, t, d, iters.max(1)].map(|v| v.to_string());
            let mut args = vec!["attention"];
            args.extend(a.iter().map(|s| s.as_str()));
            match torch_peer(&args) {
                Ok(secs) => record_peer(
                    &mut out,
                    "PyTorch scaled_dot_product_attention (causal, fwd + bwd)",
                    secs,
                ),
                Err(e) => println!("  peer PyTorch unavailable: {e}"),
            }
        }
        out
    })
}

/// The materialised reference path, through the tape.
fn attention(
    dev: &Device,
    rng: &mut Rng,
    b: usize,
    h: usize,
    t: usize,
    d: usize,
    iters: usize,
) -> Result<Measured> {
    let c = h * d;
    let qkv: Vec<f32> = random_f32(rng, b * t * 3 * c, 1.0);
    let mut tape = Tape::on_device(DType::BF16, dev);
    tape.set_attention_path(AttentionPath::Materialized);
    let (l, r) = measured(dev, iters, || {
        tape.clear();
        let x = tape.leaf(Tensor::from_vec(vec![b, t, 3 * c], qkv.clone())?, true)?;
        let y = tape.attention(x, h)?;
        let s = tape.sum(y)?;
        tape.backward_leaves(s, 1.0)?;
        Ok(())
    })?;
    let bhtt = (b * h * t * t) as u64;
    Ok(report(
        dev,
        &format!(
            "materialised attention B {b} heads {h} T {t} head size {d}: S (f32) and P (bf16), \
             {:.1} MiB per layer, kept for the backward (the list includes the harness's sum, \
             its seed and the input's casts)",
            (bhtt * 6) as f64 / (1u64 << 20) as f64
        ),
        &l,
        r,
        &Napkin {
            // The same napkin as the fused path (the causal minimum, 7 B H T^2 d): this path
            // runs six products over whole T x T squares (12 B H T^2 d).
            flops: 7 * bhtt * d as u64,
            // bf16, no T x T matrix in memory: the forward reads q, k, v and writes y; the
            // backward reads dy, q, k, v (and y or the log-sum-exp) and writes dq, dk, dv.
            bytes: 22 * (b * t * c) as u64,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_benchmark_runs_on_the_simulator_at_awkward_shapes() {
        let s = |v: &str| vec![v.to_string()];
        // The three products: one launch each, at least the napkin's tensor work (tiles pad
        // the tails) and traffic, and no bank conflicts in the mainloops.
        let g = run(KernelBench::Gemm, DeviceSpec::Sim, &s("130,200,72"), 1).unwrap();
        assert_eq!(g.len(), 3);
        for m in &g {
            assert_eq!(m.launches, 1, "{m:?}");
            assert!(m.tensor_flops >= m.napkin.flops, "{m:?}");
            assert!(m.global_bytes >= m.napkin.bytes, "{m:?}");
            assert_eq!(m.bank_conflicts, 0, "{m:?}");
        }
        let a = run(KernelBench::Adamw, DeviceSpec::Sim, &s("1001"), 1).unwrap();
        assert_eq!(a[0].launches, 1);
        assert!(a[0].global_bytes >= a[0].napkin.bytes, "{:?}", a[0]);
        let t = run(KernelBench::Attention, DeviceSpec::Sim, &s("1,2,40,32"), 1).unwrap();
        // Fused: four launches (forward, row dot, dQ, dK/dV), at least the causal napkin's
        // tensor work, no bank conflicts.
        assert_eq!(t[0].launches, 4, "{:?}", t[0]);
        assert!(t[0].tensor_flops >= t[0].napkin.flops, "{:?}", t[0]);
        assert_eq!(t[0].bank_conflicts, 0, "{:?}", t[0]);
        // Materialised: six products (two forward, four backward) of at least 2 B H T^2 d.
        assert!(t[1].tensor_flops >= t[1].napkin.flops, "{:?}", t[1]);
        assert!(t[1].launches > 6, "{:?}", t[1]);
        // Head sizes the fused kernels do not take are a clear error.
        let e = run(KernelBench::Attention, DeviceSpec::Sim, &s("1,2,40,12"), 1).unwrap_err();
        assert!(e.to_string().contains("head size 12"), "{e}");
    }

    #[test]
    fn bad_shapes_and_the_cpu_are_clear_errors() {
        let e = parse_shape("64,0,64", 3, "M, N, K")
            .unwrap_err()
            .to_string();
        assert!(e.contains("64,0,64") && e.contains("M, N, K"), "{e}");
        assert!(parse_shape("64x64", 3, "M, N, K").is_err());
        assert_eq!(
            parse_shape("8x16x32", 3, "M, N, K").unwrap(),
            vec![8, 16, 32]
        );
        let e = run(KernelBench::Gemm, DeviceSpec::Cpu, &[], 1).unwrap_err();
        assert!(e.to_string().contains("--device cuda or sim"), "{e}");
    }
}
