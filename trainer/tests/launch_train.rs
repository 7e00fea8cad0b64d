//! `lathe train` under a launcher: each process is one rank (here on its own simulated
//! device), the ranks talk over TCP through rank 0 (`TcpComm`, the in-process ranks'
//! arithmetic), and the run equals the same run with the ranks as threads of one process, bit
//! for bit. A checkpoint written by the processes resumes in one process and the other way
//! round; a rank that dies
//! stops the others with an error naming it; a CPU run under a launcher refuses.

use lathe_trainer::config::{DeviceSpec, TrainArgs};
use lathe_trainer::launch::{LaunchArgs, run_launch};
use lathe_trainer::metrics::{MetricsLine, read_metrics};
use lathe_trainer::precision::Precision;
use lathe_trainer::train::run_train;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const LATHE: &str = env!("CARGO_BIN_EXE_lathe");

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// The run's settings as `lathe train` flags, and as `TrainArgs` for the in-process run.
const FLAGS: &[&str] = &[
    "--device",
    "sim",
    "--precision",
    "bf16",
    "--zero",
    "3",
    "--micro-batch",
    "1",
    "--seq-len",
    "16",
    "--warmup",
    "2",
    "--lr",
    "0.003",
    "--eval-every",
    "0",
    "--eval-batches",
    "1",
    "--eval-problems",
    "2",
    "--loader-workers",
    "1",
    "--seed",
    "7",
    "--no-progress",
];

fn in_process(steps: u64) -> TrainArgs {
    TrainArgs {
        device: Some(DeviceSpec::Sim),
        precision: Some(Precision::Bf16),
        zero: Some(3),
        world: Some(2),
        micro_batch: Some(1),
        seq_len: Some(16),
        warmup: Some(2),
        lr: Some(3e-3),
        eval_every: Some(0),
        eval_batches: Some(1),
        eval_problems: Some(2),
        loader_workers: Some(1),
        seed: Some(7),
        no_progress: true,
        steps: Some(steps),
        ..Default::default()
    }
}

fn losses_in(log: &Path) -> Vec<u64> {
    read_metrics(log)
        .unwrap()
        .into_iter()
        .filter_map(|l| match l {
            MetricsLine::Step(s) => Some(s.loss.to_bits()),
            _ => None,
        })
        .collect()
}

#[test]
fn two_launched_processes_equal_two_threads_and_their_checkpoint_resumes_in_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("launched.jsonl");
    let save = dir.path().join("ck");
    let mut command: Vec<String> = vec![LATHE.into(), "train".into()];
    command.extend(FLAGS.iter().map(|s| s.to_string()));
    command.extend(
        [
            "--steps",
            "3",
            "--save-every",
            "2",
            "--save",
            save.to_str().unwrap(),
            "--log",
            log.to_str().unwrap(),
        ]
        .map(String::from),
    );
    let code = run_launch(LaunchArgs {
        nproc: 2,
        nnodes: 1,
        node_rank: 0,
        master: format!("127.0.0.1:{}", free_port()),
        timeout: Some(300.0),
        command,
    })
    .expect("launch");
    assert_eq!(code, 0, "the launched run failed");
    let launched = losses_in(&log);
    assert_eq!(launched.len(), 3, "rank 0 alone logs every step once");

    let saved_by_threads = dir.path().join("ck-threads");
    let threads = run_train(TrainArgs {
        save: Some(saved_by_threads.clone()),
        save_every: Some(2),
        ..in_process(3)
    })
    .expect("in-process run");
    let bits: Vec<u64> = threads.losses.iter().map(|l| l.to_bits()).collect();
    assert_eq!(launched, bits, "2 processes vs 2 threads");

    // A checkpoint written by one process (two ranks as threads) resumes as two processes.
    let log2 = dir.path().join("resumed-launched.jsonl");
    let mut command: Vec<String> = vec![LATHE.into(), "train".into()];
    command.extend(FLAGS.iter().map(|s| s.to_string()));
    command.extend(
        [
            "--steps",
            "3",
            "--resume",
            saved_by_threads.join("step-00000002").to_str().unwrap(),
            "--log",
            log2.to_str().unwrap(),
        ]
        .map(String::from),
    );
    let code = run_launch(LaunchArgs {
        nproc: 2,
        nnodes: 1,
        node_rank: 0,
        master: format!("127.0.0.1:{}", free_port()),
        timeout: Some(300.0),
        command,
    })
    .expect("launch");
    assert_eq!(code, 0, "the launched resume failed");
    assert_eq!(losses_in(&log2), bits[2..].to_vec());

    // The processes' checkpoint (written by rank 0 from every rank's shards) resumes with the
    // ranks as threads, bit for bit.
    let resumed = run_train(TrainArgs {
        resume: Some(save.join("step-00000002")),
        ..in_process(3)
    })
    .expect("resumed run");
    let rb: Vec<u64> = resumed.losses.iter().map(|l| l.to_bits()).collect();
    assert_eq!(rb, launched[2..].to_vec());
}

fn rank_process(rank: usize, port: u16, extra: &[&str]) -> Command {
    let mut c = Command::new(LATHE);
    c.arg("train").args(FLAGS).args(extra);
    for (k, v) in [
        ("LATHE_RANK", rank.to_string()),
        ("LATHE_LOCAL_RANK", rank.to_string()),
        ("LATHE_WORLD_SIZE", "2".into()),
        ("LATHE_LOCAL_WORLD_SIZE", "2".into()),
        ("LATHE_NODE_RANK", "0".into()),
        ("LATHE_MASTER_ADDR", "127.0.0.1".into()),
        ("LATHE_MASTER_PORT", port.to_string()),
    ] {
        c.env(k, v);
    }
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

#[test]
fn a_rank_that_dies_stops_the_other_with_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("run.jsonl");
    let port = free_port();
    let long = ["--steps", "100000", "--log", log.to_str().unwrap()];
    let mut r0 = rank_process(0, port, &long).spawn().unwrap();
    let mut r1 = rank_process(1, port, &["--steps", "100000"])
        .spawn()
        .unwrap();
    // Wait until the run is under way (rank 0 logged a step), then kill rank 1.
    let t0 = Instant::now();
    while !log.exists() || losses_in(&log).is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the run never started"
        );
        if let Ok(Some(s)) = r0.try_wait() {
            panic!("rank 0 exited early: {s}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    r1.kill().unwrap();
    r1.wait().unwrap();
    let killed = Instant::now();
    let status = loop {
        if let Some(s) = r0.try_wait().unwrap() {
            break s;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "rank 0 still runs after its peer died"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(r0.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(err.contains("rank 1"), "{err}");
    eprintln!(
        "rank 0 stopped {:?} after rank 1 died: {err}",
        killed.elapsed()
    );
}

#[test]
fn a_cpu_run_under_a_launcher_refuses_and_a_world_flag_conflict_is_named() {
    let port = free_port().to_string();
    let env = [
        ("LATHE_RANK", "0"),
        ("LATHE_LOCAL_RANK", "0"),
        ("LATHE_WORLD_SIZE", "2"),
        ("LATHE_LOCAL_WORLD_SIZE", "2"),
        ("LATHE_NODE_RANK", "0"),
        ("LATHE_MASTER_ADDR", "127.0.0.1"),
        ("LATHE_MASTER_PORT", port.as_str()),
    ];
    let out = Command::new(LATHE)
        .args(["train", "--device", "cpu", "--steps", "1"])
        .envs(env)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rank 0 of 2") && err.contains("--world 2") && err.contains("--device sim"),
        "{err}"
    );
    let out = Command::new(LATHE)
        .args(["train", "--device", "sim", "--world", "4", "--steps", "1"])
        .envs(env)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--world 4") && err.contains("drop --world"),
        "{err}"
    );
}
