//! `lathe launch`: start one process per local rank, as torchrun does.
//!
//! ```text
//! lathe launch --nproc N [--nnodes M --node-rank R --master HOST:PORT] -- lathe train ...
//! ```
//!
//! Each child gets its place in the run through environment variables (read them back with
//! [`LaunchEnv::from_env`]):
//!
//! | variable                 | value                                   |
//! |--------------------------|-----------------------------------------|
//! | `LATHE_RANK`             | `node_rank * nproc + local_rank`        |
//! | `LATHE_LOCAL_RANK`       | `0..nproc` on this node                 |
//! | `LATHE_WORLD_SIZE`       | `nnodes * nproc`                        |
//! | `LATHE_LOCAL_WORLD_SIZE` | `nproc`                                 |
//! | `LATHE_NODE_RANK`        | `node_rank`                             |
//! | `LATHE_MASTER_ADDR`      | host part of `--master`                 |
//! | `LATHE_MASTER_PORT`      | port part of `--master`                 |
//!
//! The launcher itself opens no socket: global rank 0 serves the rendezvous
//! (`lathe_host::comm::rendezvous`) on the master address, the other ranks join it. On a
//! multi-node run start one launcher per node with the same `--nnodes`, `--nproc` and
//! `--master` (an address of node 0 that every node can reach) and its own `--node-rank`.
//!
//! The launcher waits for its children. When one exits with a failure, it kills the others on
//! this node (SIGKILL: a rank stuck in a collective would not react to anything gentler) and
//! returns the failed child's exit code; a child killed by signal `s` counts as `128 + s`. When
//! all exit cleanly it returns 0. Children inherit the launcher's stdin, stdout and stderr.
//!
//! SIGINT and SIGTERM sent to the launcher are forwarded to every child, so that no rank is left
//! running as an orphan; `--timeout SECS` sends SIGTERM to every child once the run has taken
//! that long. Children still running [`GRACE`] after either are killed. The launcher then
//! returns `128 + signal`, or 124 after a timeout (as `timeout(1)` does).

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;

/// Global rank of the process.
pub const ENV_RANK: &str = "LATHE_RANK";
/// Rank among the processes of this node.
pub const ENV_LOCAL_RANK: &str = "LATHE_LOCAL_RANK";
/// Number of processes in the run.
pub const ENV_WORLD_SIZE: &str = "LATHE_WORLD_SIZE";
/// Number of processes on this node.
pub const ENV_LOCAL_WORLD_SIZE: &str = "LATHE_LOCAL_WORLD_SIZE";
/// Index of this node.
pub const ENV_NODE_RANK: &str = "LATHE_NODE_RANK";
/// Host of rank 0's rendezvous.
pub const ENV_MASTER_ADDR: &str = "LATHE_MASTER_ADDR";
/// Port of rank 0's rendezvous.
pub const ENV_MASTER_PORT: &str = "LATHE_MASTER_PORT";

/// How often the launcher looks at its children.
const POLL: Duration = Duration::from_millis(20);

/// How long children get to exit after a forwarded signal or a timeout before they are killed.
pub const GRACE: Duration = Duration::from_secs(10);

/// Exit code of a run stopped by `--timeout`.
pub const TIMEOUT_EXIT: i32 = 124;

const SIGTERM: i32 = 15;

/// Arguments of `lathe launch`.
#[derive(Parser, Debug, Clone, PartialEq)]
#[command(
    name = "launch",
    about = "Start one process per rank with LATHE_RANK, LATHE_WORLD_SIZE, ... set"
)]
pub struct LaunchArgs {
    /// Processes (ranks) to start on this node.
    #[arg(long, default_value_t = 1)]
    pub nproc: usize,

    /// Nodes in the run, each running its own launcher.
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,

    /// This node's index in 0..nnodes.
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,

    /// HOST:PORT of global rank 0's rendezvous (on several nodes: an address of node 0 the
    /// other nodes can reach).
    #[arg(long, default_value = "127.0.0.1:29500")]
    pub master: String,

    /// Stop the ranks (SIGTERM, then SIGKILL after a grace period) once the run has taken
    /// this many seconds, and exit with 124.
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<f64>,

    /// The command every rank runs, after `--`. A leading `lathe` runs the executable of this
    /// launcher when it is itself `lathe`, so no `lathe` needs to be on the PATH.
    #[arg(last = true, required = true, num_args = 1..)]
    pub command: Vec<String>,
}

/// Which launcher's variables a [`LaunchEnv`] was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LaunchSource {
    /// `lathe launch` (`LATHE_RANK`, ...).
    #[default]
    Lathe,
    /// torchrun and launchers that follow it (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
    /// `LOCAL_WORLD_SIZE`, `GROUP_RANK`, `MASTER_ADDR`, `MASTER_PORT`).
    Torchrun,
    /// A Slurm job step (`SLURM_PROCID`, `SLURM_STEP_NUM_TASKS`, `SLURM_LOCALID`, `SLURM_NODEID`, the
    /// tasks on this node from `SLURM_NTASKS_PER_NODE` or `SLURM_STEP_TASKS_PER_NODE`, the
    /// master from `MASTER_ADDR` or the first host of `SLURM_STEP_NODELIST` /
    /// `SLURM_JOB_NODELIST`, the port from `MASTER_PORT` or [`SLURM_BASE_PORT`]).
    Slurm,
}

impl std::fmt::Display for LaunchSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LaunchSource::Lathe => "`lathe launch`",
            LaunchSource::Torchrun => "a torchrun-style launcher (RANK, WORLD_SIZE)",
            LaunchSource::Slurm => "Slurm's srun (SLURM_PROCID, SLURM_STEP_NUM_TASKS)",
        })
    }
}

/// Torchrun's variables.
pub const TORCHRUN_VARS: [&str; 7] = [
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
];

/// The rendezvous port of a Slurm run that sets no `MASTER_PORT`: this base plus the job id
/// modulo 1000, so that two jobs sharing a node do not collide.
pub const SLURM_BASE_PORT: u16 = 29500;

/// A rank's place in a launched run, as read from the environment the launcher set.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LaunchEnv {
    pub rank: usize,
    pub local_rank: usize,
    pub world_size: usize,
    pub local_world_size: usize,
    pub node_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// Which launcher set the variables.
    pub source: LaunchSource,
}

impl LaunchEnv {
    /// Reads the process environment: `lathe launch`'s variables, else torchrun's (`RANK`
    /// with `WORLD_SIZE`), else those of a Slurm job step started by `srun` (`SLURM_PROCID`
    /// with `SLURM_STEP_NUM_TASKS`). `Ok(None)` when
    /// none is set (a process started by hand); an error when the variables of the launcher
    /// found are incomplete, malformed or inconsistent.
    pub fn from_env() -> anyhow::Result<Option<Self>> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Like [`LaunchEnv::from_env`] with another source of variables.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> anyhow::Result<Option<Self>> {
        let env = if get(ENV_RANK).is_some() {
            Self::lathe(&get)?
        } else if get("RANK").is_some() && get("WORLD_SIZE").is_some() {
            Self::torchrun(&get).context("reading torchrun's environment")?
        } else if get("SLURM_PROCID").is_some() && get("SLURM_STEP_NUM_TASKS").is_some() {
            Self::slurm(&get).context("reading Slurm's environment")?
        } else {
            return Ok(None);
        };
        if env.rank >= env.world_size
            || env.local_rank >= env.local_world_size
            || env.local_world_size > env.world_size
        {
            bail!(
                "inconsistent launch environment ({}): rank {} of {}, local rank {} of {}",
                env.source,
                env.rank,
                env.world_size,
                env.local_rank,
                env.local_world_size
            );
        }
        Ok(Some(env))
    }

    fn torchrun(get: &impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let number = |name: &str| -> anyhow::Result<usize> {
            let v = get(name).with_context(|| format!("RANK is set but {name} is not"))?;
            parse_count(name, &v)
        };
        let world_size = number("WORLD_SIZE")?;
        let local_world_size = match get("LOCAL_WORLD_SIZE") {
            Some(v) => parse_count("LOCAL_WORLD_SIZE", &v)?,
            None => world_size,
        };
        Ok(LaunchEnv {
            rank: number("RANK")?,
            local_rank: number("LOCAL_RANK")?,
            world_size,
            local_world_size,
            node_rank: match get("GROUP_RANK") {
                Some(v) => parse_count("GROUP_RANK", &v)?,
                None => 0,
            },
            master_addr: get("MASTER_ADDR").context("RANK is set but MASTER_ADDR is not")?,
            master_port: parse_port(
                "MASTER_PORT",
                &get("MASTER_PORT").context("RANK is set but MASTER_PORT is not")?,
            )?,
            source: LaunchSource::Torchrun,
        })
    }

    fn slurm(get: &impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let number = |name: &str| -> anyhow::Result<usize> {
            let v = get(name).with_context(|| format!("SLURM_PROCID is set but {name} is not"))?;
            parse_count(name, &v)
        };
        // The job step's tasks (a batch script's own process, outside any step, has
        // SLURM_NTASKS but no step and is not a launched rank).
        let world_size = number("SLURM_STEP_NUM_TASKS")?;
        let node_rank = match get("SLURM_NODEID") {
            Some(v) => parse_count("SLURM_NODEID", &v)?,
            None => 0,
        };
        // Tasks on this node: SLURM_NTASKS_PER_NODE when given, else this node's entry of the
        // step's (or job's) compressed tasks-per-node list, else all of them.
        let local_world_size = if let Some(v) = get("SLURM_NTASKS_PER_NODE") {
            parse_count("SLURM_NTASKS_PER_NODE", &v)?
        } else if let Some(v) =
            get("SLURM_STEP_TASKS_PER_NODE").or_else(|| get("SLURM_TASKS_PER_NODE"))
        {
            tasks_on_node(&v, node_rank)
                .with_context(|| format!("SLURM_STEP_TASKS_PER_NODE={v:?}"))?
        } else {
            world_size
        };
        let nodelist = get("SLURM_STEP_NODELIST")
            .or_else(|| get("SLURM_JOB_NODELIST"))
            .or_else(|| get("SLURM_NODELIST"));
        let master_addr = match get("MASTER_ADDR") {
            Some(a) => a,
            None => {
                let list = nodelist.context(
                    "SLURM_PROCID is set but neither MASTER_ADDR nor SLURM_JOB_NODELIST is",
                )?;
                first_host(&list).with_context(|| format!("SLURM_JOB_NODELIST={list:?}"))?
            }
        };
        let master_port = match get("MASTER_PORT") {
            Some(p) => parse_port("MASTER_PORT", &p)?,
            None => {
                let job = match get("SLURM_JOB_ID") {
                    Some(j) => parse_count("SLURM_JOB_ID", &j)?,
                    None => 0,
                };
                SLURM_BASE_PORT + (job % 1000) as u16
            }
        };
        Ok(LaunchEnv {
            rank: number("SLURM_PROCID")?,
            local_rank: match get("SLURM_LOCALID") {
                Some(v) => parse_count("SLURM_LOCALID", &v)?,
                None => 0,
            },
            world_size,
            local_world_size,
            node_rank,
            master_addr,
            master_port,
            source: LaunchSource::Slurm,
        })
    }

    fn lathe(get: &impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let number = |name: &str| -> anyhow::Result<usize> {
            let v = get(name).with_context(|| format!("{ENV_RANK} is set but {name} is not"))?;
            v.trim()
                .parse()
                .with_context(|| format!("{name}={v:?} is not a non-negative integer"))
        };
        let env = LaunchEnv {
            rank: number(ENV_RANK)?,
            local_rank: number(ENV_LOCAL_RANK)?,
            world_size: number(ENV_WORLD_SIZE)?,
            local_world_size: number(ENV_LOCAL_WORLD_SIZE)?,
            node_rank: number(ENV_NODE_RANK)?,
            master_addr: get(ENV_MASTER_ADDR)
                .with_context(|| format!("{ENV_RANK} is set but {ENV_MASTER_ADDR} is not"))?,
            master_port: {
                let v = get(ENV_MASTER_PORT)
                    .with_context(|| format!("{ENV_RANK} is set but {ENV_MASTER_PORT} is not"))?;
                v.trim()
                    .parse()
                    .with_context(|| format!("{ENV_MASTER_PORT}={v:?} is not a port number"))?
            },
            source: LaunchSource::Lathe,
        };
        Ok(env)
    }

    /// The rendezvous address `HOST:PORT` (IPv6 hosts in brackets).
    pub fn master(&self) -> String {
        join_host_port(&self.master_addr, self.master_port)
    }
}

fn parse_count(name: &str, v: &str) -> anyhow::Result<usize> {
    v.trim()
        .parse()
        .with_context(|| format!("{name}={v:?} is not a non-negative integer"))
}

fn parse_port(name: &str, v: &str) -> anyhow::Result<u16> {
    match v.trim().parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => bail!("{name}={v:?} is not a port number (1-65535)"),
    }
}

/// This node's task count from Slurm's compressed tasks-per-node list: `2(x3),1` means nodes
/// 0-2 run 2 tasks each and node 3 runs 1.
pub fn tasks_on_node(list: &str, node: usize) -> anyhow::Result<usize> {
    let mut first = 0usize;
    for entry in list.split(',') {
        let entry = entry.trim();
        let (count, repeat) = match entry.split_once("(x") {
            Some((c, r)) => {
                let r = r
                    .strip_suffix(')')
                    .with_context(|| format!("entry {entry:?} lacks its closing parenthesis"))?;
                (c, parse_count("the repeat count", r)?)
            }
            None => (entry, 1),
        };
        let count = parse_count("the task count", count)?;
        if node < first + repeat {
            return Ok(count);
        }
        first += repeat;
    }
    bail!("the list covers {first} nodes, this is node {node}")
}

/// The first host of a Slurm hostlist: `gpu[07-09,12],login1` gives `gpu07`, and
/// `rack[1-2]-n[01-04]` gives `rack1-n01` (the first value of every bracket, zero padding kept).
pub fn first_host(list: &str) -> anyhow::Result<String> {
    // The first entry: up to the first comma outside brackets.
    let mut depth = 0i32;
    let mut end = list.len();
    for (i, c) in list.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                end = i;
                break;
            }
            _ => {}
        }
        if depth < 0 {
            bail!("unbalanced brackets");
        }
    }
    let entry = list[..end].trim();
    let mut host = String::new();
    let mut rest = entry;
    while let Some(open) = rest.find('[') {
        host.push_str(&rest[..open]);
        let close = rest[open..]
            .find(']')
            .map(|c| open + c)
            .context("unbalanced brackets")?;
        let inner = &rest[open + 1..close];
        let first = inner
            .split(',')
            .next()
            .and_then(|r| r.split('-').next())
            .map(str::trim)
            .filter(|f| !f.is_empty() && f.chars().all(|c| c.is_ascii_digit()))
            .with_context(|| format!("bracket [{inner}] holds no number range"))?;
        host.push_str(first);
        rest = &rest[close + 1..];
    }
    host.push_str(rest);
    if host.is_empty() {
        bail!("no host in the list");
    }
    Ok(host)
}

fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Splits `HOST:PORT` (IPv6 as `[addr]:port`) into the host, without brackets, and the port.
fn split_master(master: &str) -> anyhow::Result<(String, u16)> {
    let (host, port) = master
        .rsplit_once(':')
        .with_context(|| format!("--master {master:?} is not HOST:PORT"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        bail!("--master {master:?} has an empty host");
    }
    let port: u16 = port
        .parse()
        .with_context(|| format!("--master {master:?}: {port:?} is not a port number"))?;
    if port == 0 {
        bail!("--master {master:?}: port 0 cannot be shared with the other ranks");
    }
    Ok((host.to_string(), port))
}

/// The program to run: a leading `lathe` means this executable when this executable is `lathe`.
fn resolve_program(name: &str) -> PathBuf {
    if name == "lathe"
        && let Ok(exe) = std::env::current_exe()
        && exe.file_stem().is_some_and(|s| s == "lathe")
    {
        return exe;
    }
    PathBuf::from(name)
}

/// The exit code a failed child is reported with: its code, or `128 + signal` when killed.
fn exit_code(status: ExitStatus) -> i32 {
    if let Some(code) = status.code() {
        return code;
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            return 128 + signal;
        }
    }
    1
}

/// Kills and reaps every child still running (best effort: one may have exited meanwhile).
fn stop_all(children: &mut [Option<Child>]) {
    for child in children.iter_mut().flatten() {
        let _ = child.kill();
    }
    for slot in children.iter_mut() {
        if let Some(mut child) = slot.take() {
            let _ = child.wait();
        }
    }
}

/// Starts `nproc` children running `args.command` and waits for them; returns the exit code
/// the launcher should exit with (0, or the first failed child's code). Errors (bad arguments,
/// a child that cannot be started) stop every child already started.
pub fn run_launch(args: LaunchArgs) -> anyhow::Result<i32> {
    if args.nproc == 0 {
        bail!("--nproc must be at least 1");
    }
    if args.nnodes == 0 {
        bail!("--nnodes must be at least 1");
    }
    if args.node_rank >= args.nnodes {
        bail!(
            "--node-rank {} is not a node of --nnodes {}",
            args.node_rank,
            args.nnodes
        );
    }
    let world = args
        .nproc
        .checked_mul(args.nnodes)
        .context("--nproc x --nnodes overflows")?;
    let (host, port) = split_master(&args.master)?;
    if let Some(t) = args.timeout
        && !(t.is_finite() && t > 0.0 && t < 1e9)
    {
        bail!("--timeout must be a positive number of seconds (got {t})");
    }
    let deadline = args.timeout.map(Duration::from_secs_f64);
    // Forward SIGINT/SIGTERM to the children instead of dying and leaving them orphaned.
    crate::signals::install();
    let started = std::time::Instant::now();
    let Some((program, rest)) = args.command.split_first() else {
        bail!("no command given: put it after `--`, e.g. `lathe launch --nproc 2 -- lathe train`");
    };
    let program = resolve_program(program);

    let mut children: Vec<Option<Child>> = Vec::with_capacity(args.nproc);
    for local_rank in 0..args.nproc {
        let rank = args.node_rank * args.nproc + local_rank;
        let spawned = Command::new(&program)
            .args(rest)
            .env(ENV_RANK, rank.to_string())
            .env(ENV_LOCAL_RANK, local_rank.to_string())
            .env(ENV_WORLD_SIZE, world.to_string())
            .env(ENV_LOCAL_WORLD_SIZE, args.nproc.to_string())
            .env(ENV_NODE_RANK, args.node_rank.to_string())
            .env(ENV_MASTER_ADDR, &host)
            .env(ENV_MASTER_PORT, port.to_string())
            .spawn();
        match spawned {
            Ok(child) => children.push(Some(child)),
            Err(e) => {
                stop_all(&mut children);
                return Err(e)
                    .with_context(|| format!("starting rank {rank} as {}", program.display()));
            }
        }
    }

    // Why and since when the ranks are being stopped: (exit code, when the stop began).
    let mut stopping: Option<(i32, std::time::Instant)> = None;
    loop {
        if stopping.is_none() {
            let why = if let Some(sig) = crate::signals::received() {
                eprintln!(
                    "lathe launch: caught {}; forwarding it to the ranks",
                    crate::signals::name(sig)
                );
                Some((sig, 128 + sig))
            } else if deadline.is_some_and(|d| started.elapsed() >= d) {
                eprintln!(
                    "lathe launch: --timeout {}s reached; stopping the ranks",
                    args.timeout.unwrap_or_default()
                );
                Some((SIGTERM, TIMEOUT_EXIT))
            } else {
                None
            };
            if let Some((sig, code)) = why {
                for child in children.iter().flatten() {
                    crate::signals::send(child.id(), sig);
                }
                stopping = Some((code, std::time::Instant::now()));
            }
        }
        if let Some((code, since)) = stopping {
            let mut running = 0;
            for slot in children.iter_mut() {
                if let Some(child) = slot {
                    match child.try_wait() {
                        Ok(Some(_)) | Err(_) => *slot = None,
                        Ok(None) => running += 1,
                    }
                }
            }
            if running == 0 {
                return Ok(code);
            }
            if since.elapsed() >= GRACE {
                eprintln!(
                    "lathe launch: {running} rank(s) still running {}s later; killing them",
                    GRACE.as_secs()
                );
                stop_all(&mut children);
                return Ok(code);
            }
            std::thread::sleep(POLL);
            continue;
        }
        let mut running = 0;
        let mut failed: Option<(usize, ExitStatus)> = None;
        for (local_rank, slot) in children.iter_mut().enumerate() {
            let Some(child) = slot else { continue };
            match child.try_wait() {
                Ok(Some(status)) => {
                    *slot = None;
                    if !status.success() {
                        failed = Some((local_rank, status));
                        break;
                    }
                }
                Ok(None) => running += 1,
                Err(e) => {
                    stop_all(&mut children);
                    return Err(e).context("waiting for the ranks");
                }
            }
        }
        if let Some((local_rank, status)) = failed {
            let rank = args.node_rank * args.nproc + local_rank;
            eprintln!("lathe launch: rank {rank} {status}; stopping the other ranks");
            stop_all(&mut children);
            return Ok(exit_code(status));
        }
        if running == 0 {
            return Ok(0);
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn master_addresses_split_and_join() {
        assert_eq!(
            split_master("127.0.0.1:29500").expect("v4"),
            ("127.0.0.1".to_string(), 29500)
        );
        assert_eq!(
            split_master("[::1]:1234").expect("v6"),
            ("::1".to_string(), 1234)
        );
        assert_eq!(join_host_port("::1", 1234), "[::1]:1234");
        assert!(split_master("localhost").is_err());
        assert!(split_master("host:99999").is_err());
        assert!(split_master(":80").is_err());
        assert!(split_master("host:0").is_err());
    }
}
