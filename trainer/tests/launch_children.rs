//! `lathe launch` with tiny shell children: environment, exit codes, failure handling.
#![cfg(unix)]

use std::time::{Duration, Instant};

use clap::Parser;
use lathe_trainer::launch::{
    LaunchArgs, LaunchEnv, LaunchSource, SLURM_BASE_PORT, first_host, run_launch, tasks_on_node,
};

fn args(nproc: usize, nnodes: usize, node_rank: usize, script: &str, arg: &str) -> LaunchArgs {
    LaunchArgs {
        nproc,
        nnodes,
        node_rank,
        master: "127.0.0.1:29533".to_string(),
        timeout: None,
        command: vec![
            "sh".to_string(),
            "-c".to_string(),
            script.to_string(),
            arg.to_string(),
        ],
    }
}

/// Each child writes its variables to `$0/rank_$LATHE_RANK`.
const WRITE_ENV: &str = r#"echo "$LATHE_RANK $LATHE_LOCAL_RANK $LATHE_WORLD_SIZE $LATHE_LOCAL_WORLD_SIZE $LATHE_NODE_RANK $LATHE_MASTER_ADDR $LATHE_MASTER_PORT" > "$0/rank_$LATHE_RANK""#;

#[test]
fn children_get_their_ranks_and_success_is_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf-8 path");
    let code = run_launch(args(3, 1, 0, WRITE_ENV, d)).expect("launch");
    assert_eq!(code, 0);
    for rank in 0..3 {
        let line = std::fs::read_to_string(dir.path().join(format!("rank_{rank}"))).expect("file");
        assert_eq!(line.trim(), format!("{rank} {rank} 3 3 0 127.0.0.1 29533"));
    }
}

#[test]
fn second_node_numbers_its_ranks_after_the_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf-8 path");
    assert_eq!(run_launch(args(2, 2, 1, WRITE_ENV, d)).expect("launch"), 0);
    for (rank, local) in [(2, 0), (3, 1)] {
        let line = std::fs::read_to_string(dir.path().join(format!("rank_{rank}"))).expect("file");
        assert_eq!(line.trim(), format!("{rank} {local} 4 2 1 127.0.0.1 29533"));
    }
    assert!(!dir.path().join("rank_0").exists());
}

#[test]
fn a_failing_rank_stops_the_others_and_its_code_is_returned() {
    // Rank 1 fails at once; the others would sleep for a minute if not killed.
    let script = r#"if [ "$LATHE_RANK" = 1 ]; then exit 7; fi; exec sleep 60"#;
    let started = Instant::now();
    let code = run_launch(args(3, 1, 0, script, "x")).expect("launch");
    assert_eq!(code, 7);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_child_killed_by_a_signal_reports_128_plus_the_signal() {
    let code = run_launch(args(1, 1, 0, "kill -9 $$", "x")).expect("launch");
    assert_eq!(code, 128 + 9);
}

#[test]
fn bad_arguments_and_missing_programs_are_errors() {
    let mut a = args(0, 1, 0, "true", "x");
    assert!(run_launch(a.clone()).is_err());
    a.nproc = 1;
    a.node_rank = 1;
    assert!(run_launch(a.clone()).is_err());
    a.node_rank = 0;
    a.master = "no-port".to_string();
    assert!(run_launch(a.clone()).is_err());
    a.master = "127.0.0.1:29533".to_string();
    a.command = vec!["/nonexistent/lathe-child".to_string()];
    let e = run_launch(a).expect_err("cannot start");
    assert!(
        format!("{e:#}").contains("/nonexistent/lathe-child"),
        "{e:#}"
    );
}

#[test]
fn command_line_parses_everything_after_the_separator() {
    let a = LaunchArgs::try_parse_from([
        "launch",
        "--nproc",
        "4",
        "--nnodes",
        "2",
        "--node-rank",
        "1",
        "--master",
        "10.0.0.1:700",
        "--",
        "lathe",
        "train",
        "--steps",
        "3",
    ])
    .expect("parse");
    assert_eq!((a.nproc, a.nnodes, a.node_rank), (4, 2, 1));
    assert_eq!(a.master, "10.0.0.1:700");
    assert_eq!(a.command, ["lathe", "train", "--steps", "3"]);
    assert!(LaunchArgs::try_parse_from(["launch", "--nproc", "2"]).is_err());
}

#[test]
fn launch_env_reads_back_what_the_launcher_sets() {
    let vars = [
        ("LATHE_RANK", "3"),
        ("LATHE_LOCAL_RANK", "1"),
        ("LATHE_WORLD_SIZE", "4"),
        ("LATHE_LOCAL_WORLD_SIZE", "2"),
        ("LATHE_NODE_RANK", "1"),
        ("LATHE_MASTER_ADDR", "127.0.0.1"),
        ("LATHE_MASTER_PORT", "29533"),
    ];
    let lookup = |name: &str| {
        vars.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    };
    let env = LaunchEnv::from_lookup(lookup)
        .expect("valid")
        .expect("launched");
    assert_eq!((env.rank, env.local_rank, env.world_size), (3, 1, 4));
    assert_eq!(env.master(), "127.0.0.1:29533");
    assert_eq!(
        LaunchEnv::from_lookup(|_| None).expect("not launched"),
        None
    );
    let broken = |name: &str| {
        if name == "LATHE_WORLD_SIZE" {
            Some("x".into())
        } else {
            lookup(name)
        }
    };
    assert!(LaunchEnv::from_lookup(broken).is_err());
}

fn lookup_in<'a>(vars: &'a [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> + 'a {
    move |name: &str| {
        vars.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    }
}

#[test]
fn torchrun_and_slurm_environments_give_the_ranks() {
    let torchrun = [
        ("RANK", "5"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "4"),
        ("GROUP_RANK", "1"),
        ("MASTER_ADDR", "10.0.0.7"),
        ("MASTER_PORT", "29400"),
    ];
    let env = LaunchEnv::from_lookup(lookup_in(&torchrun))
        .expect("valid")
        .expect("launched");
    assert_eq!(
        (
            env.rank,
            env.local_rank,
            env.world_size,
            env.local_world_size,
            env.node_rank
        ),
        (5, 1, 8, 4, 1)
    );
    assert_eq!(env.source, LaunchSource::Torchrun);
    assert_eq!(env.master(), "10.0.0.7:29400");

    // srun over 3 nodes, 2 tasks each except the last: rank 4 is node 2's first task. The
    // master is the first host of the compressed node list; the port follows the job id.
    let slurm = [
        ("SLURM_PROCID", "4"),
        ("SLURM_NTASKS", "5"),
        ("SLURM_STEP_NUM_TASKS", "5"),
        ("SLURM_LOCALID", "0"),
        ("SLURM_NODEID", "2"),
        ("SLURM_STEP_TASKS_PER_NODE", "2(x2),1"),
        ("SLURM_JOB_NODELIST", "gpu[07-08,12],login1"),
        ("SLURM_JOB_ID", "123456"),
    ];
    let env = LaunchEnv::from_lookup(lookup_in(&slurm))
        .expect("valid")
        .expect("launched");
    assert_eq!(
        (
            env.rank,
            env.local_rank,
            env.world_size,
            env.local_world_size,
            env.node_rank
        ),
        (4, 0, 5, 1, 2)
    );
    assert_eq!(env.source, LaunchSource::Slurm);
    assert_eq!(env.master(), format!("gpu07:{}", SLURM_BASE_PORT + 456));

    // Lathe's own variables win over the others; an inconsistent set is an error naming the
    // launcher.
    let both = [("LATHE_RANK", "0"), ("RANK", "1"), ("WORLD_SIZE", "2")];
    let e = LaunchEnv::from_lookup(lookup_in(&both)).unwrap_err();
    assert!(format!("{e:#}").contains("LATHE_LOCAL_RANK"), "{e:#}");
    let bad = [
        ("SLURM_PROCID", "3"),
        ("SLURM_STEP_NUM_TASKS", "2"),
        ("MASTER_ADDR", "n1"),
    ];
    let e = LaunchEnv::from_lookup(lookup_in(&bad)).unwrap_err();
    assert!(
        format!("{e:#}").contains("Slurm") && format!("{e:#}").contains("rank 3 of 2"),
        "{e:#}"
    );
    let bad_port = [
        ("RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("LOCAL_RANK", "0"),
        ("MASTER_ADDR", "h"),
        ("MASTER_PORT", "0"),
    ];
    let e = LaunchEnv::from_lookup(lookup_in(&bad_port)).unwrap_err();
    assert!(format!("{e:#}").contains("MASTER_PORT"), "{e:#}");
    // A batch script's own process (a job, no step) is not a launched rank.
    let batch = [
        ("SLURM_PROCID", "0"),
        ("SLURM_NTASKS", "4"),
        ("SLURM_JOB_ID", "7"),
    ];
    assert_eq!(LaunchEnv::from_lookup(lookup_in(&batch)).unwrap(), None);
}

#[test]
fn slurm_hostlists_and_task_lists_are_read() {
    assert_eq!(first_host("node01").unwrap(), "node01");
    assert_eq!(first_host("a,b").unwrap(), "a");
    assert_eq!(first_host("gpu[007-010]").unwrap(), "gpu007");
    assert_eq!(first_host("rack[3,5]-n[01-04],x").unwrap(), "rack3-n01");
    assert!(first_host("gpu[07").is_err());
    assert!(first_host("gpu[]").is_err());
    assert_eq!(tasks_on_node("4", 0).unwrap(), 4);
    assert_eq!(tasks_on_node("2(x3),1", 2).unwrap(), 2);
    assert_eq!(tasks_on_node("2(x3),1", 3).unwrap(), 1);
    assert!(tasks_on_node("2(x3),1", 4).is_err());
    assert!(tasks_on_node("2(x3", 0).is_err());
}

#[test]
fn a_timeout_stops_every_rank_with_124() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf-8 path");
    // Each rank records its pid, then sleeps for a minute.
    let script = r#"echo $$ > "$0/pid_$LATHE_RANK"; exec sleep 60"#;
    let started = Instant::now();
    let code = run_launch(LaunchArgs {
        timeout: Some(0.5),
        ..args(2, 1, 0, script, d)
    })
    .expect("launch");
    assert_eq!(code, 124);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    for rank in 0..2 {
        let pid = std::fs::read_to_string(dir.path().join(format!("pid_{rank}"))).expect("pid");
        assert!(
            !std::path::Path::new(&format!("/proc/{}", pid.trim())).exists(),
            "rank {rank} still runs"
        );
    }
    assert!(
        run_launch(LaunchArgs {
            timeout: Some(-1.0),
            ..args(1, 1, 0, "true", "x")
        })
        .is_err()
    );
}

#[test]
fn sigterm_to_the_launcher_reaches_every_rank() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf-8 path");
    let script = r#"echo $$ > "$0/pid_$LATHE_RANK"; exec sleep 60"#;
    let mut launcher = std::process::Command::new(env!("CARGO_BIN_EXE_lathe"))
        .args(["launch", "--nproc", "2", "--", "sh", "-c", script, d])
        .spawn()
        .expect("start the launcher");
    let pids: Vec<String> = {
        let t0 = Instant::now();
        loop {
            let p: Vec<String> = (0..2)
                .filter_map(|r| std::fs::read_to_string(dir.path().join(format!("pid_{r}"))).ok())
                .filter(|s| s.ends_with('\n'))
                .collect();
            if p.len() == 2 {
                break p;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "ranks never started"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    lathe_trainer::signals::send(launcher.id(), 15);
    let status = launcher.wait().expect("wait");
    assert_eq!(status.code(), Some(128 + 15), "{status}");
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{}", pid.trim())).exists(),
            "rank {} was orphaned",
            pid.trim()
        );
    }
}

#[test]
fn launched_cpu_training_is_refused_instead_of_run_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("run.jsonl");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lathe"))
        .args([
            "launch",
            "--nproc",
            "2",
            "--master",
            "127.0.0.1:29534",
            "--",
        ])
        .args(["lathe", "train", "--device", "cpu", "--steps", "2", "--log"])
        .arg(&log)
        .output()
        .expect("run the launcher");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("rank") && err.contains("--world 2"), "{err}");
    assert!(!log.exists(), "a rank trained");
}
