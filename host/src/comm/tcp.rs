//! [`TcpComm`]: the ranks of a run as separate processes (on one machine or several), on host
//! buffers, over TCP.
//!
//! A star: every collective goes through rank 0, which receives each peer's contribution in
//! rank order, combines them with the same [`CommElement::reduce`] fold as [`LocalComm`]
//! (rank 0, 1, ..., N-1), and sends the result back. So N processes compute exactly what N
//! threads of a [`LocalGroup`] compute, bit for bit, and a multi-process run can be checked
//! against an in-process one. It is a correctness transport (the CPU backend's, and a test
//! double for the trainer's multi-process paths), not a fast one: rank 0 moves `2 (N - 1)`
//! buffers per reduction.
//!
//! Wire format, per collective (integers little-endian, elements in the machine's own byte
//! order: every rank runs the same build):
//! - peer to rank 0: a header (`u8` kind, `u8` dtype size, `u8` reduction, `u32` root, `u64`
//!   element count, `u64` payload bytes) and the payload;
//! - rank 0 to peer: `u8` status (0 ok, 1 failed), `u64` length, then the result, or a UTF-8
//!   message saying why the collective failed.
//!
//! Failures are bounded: every read and write has the communicator's timeout. A peer that
//! exits closes its socket, and rank 0 reports it by rank at once; rank 0 then tells the other
//! peers (status 1), so every process stops with an error naming the first failure instead of
//! waiting. After a failure the communicator is broken: every later call fails at once.
//!
//! Connection set-up ([`TcpComm::connect_group`]) uses the rendezvous: rank 0 binds one data
//! listener per communicator on its address of `master`, hands their addresses out through the
//! rendezvous, and accepts one connection per peer on each; each peer says who it is. The same
//! rendezvous round can carry a few more bytes of rank 0's ([`TcpComm::connect_group_sharing`]):
//! that is how a multi-process device run hands NCCL's unique id to every rank.
//!
//! [`LocalComm`]: super::LocalComm
//! [`LocalGroup`]: super::LocalGroup

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{CommElement, CommError, Communicator, ReduceOp, rendezvous, shard_range};

const HELLO: &[u8; 8] = b"LATHETC1";
const HEADER_LEN: usize = 1 + 1 + 1 + 4 + 8 + 8;
const CONNECT_RETRY: Duration = Duration::from_millis(20);
/// The line of the set-up blob that carries rank 0's shared bytes, in hex (the other lines
/// are data listener addresses).
const SHARED_PREFIX: &str = "shared ";

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    AllReduce = 1,
    ReduceScatter = 2,
    AllGather = 3,
    Broadcast = 4,
    Barrier = 5,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::AllReduce => "all_reduce",
            Kind::ReduceScatter => "reduce_scatter",
            Kind::AllGather => "all_gather",
            Kind::Broadcast => "broadcast",
            Kind::Barrier => "barrier",
        }
    }
}

/// What every rank must agree on for one collective.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    kind: u8,
    elem: u8,
    op: u8,
    root: u32,
    total: u64,
    payload: u64,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = self.kind;
        b[1] = self.elem;
        b[2] = self.op;
        b[3..7].copy_from_slice(&self.root.to_le_bytes());
        b[7..15].copy_from_slice(&self.total.to_le_bytes());
        b[15..23].copy_from_slice(&self.payload.to_le_bytes());
        b
    }

    fn decode(b: &[u8; HEADER_LEN]) -> Self {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Header {
            kind: b[0],
            elem: b[1],
            op: b[2],
            root: u32_at(3),
            total: u64_at(7),
            payload: u64_at(15),
        }
    }

    /// The collective as a message names it (payload left out: it differs by rank).
    fn describe(&self) -> String {
        format!(
            "kind {} of {} elements of {} bytes, reduction {}, root {}",
            self.kind, self.total, self.elem, self.op, self.root
        )
    }

    fn same_collective(&self, other: &Header) -> bool {
        (self.kind, self.elem, self.op, self.root, self.total)
            == (other.kind, other.elem, other.op, other.root, other.total)
    }
}

fn op_code(op: ReduceOp) -> u8 {
    match op {
        ReduceOp::Sum => 1,
        ReduceOp::Avg => 2,
        ReduceOp::Max => 3,
    }
}

fn as_bytes<T: CommElement>(v: &[T]) -> &[u8] {
    // SAFETY: `CommElement` types are plain numbers (f32, f64, f16, bf16: `NcclType` admits
    // nothing else), with no padding and every bit pattern valid; the byte view covers exactly
    // the slice's memory and lives no longer than the borrow.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

fn as_bytes_mut<T: CommElement>(v: &mut [T]) -> &mut [u8] {
    // SAFETY: as in `as_bytes`; any byte pattern written is a valid value of `T`.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, std::mem::size_of_val(v)) }
}

/// One rank's end of a multi-process group over TCP. See the module documentation.
pub struct TcpComm {
    rank: usize,
    world: usize,
    timeout: Duration,
    /// Rank 0: the stream of peer `r` at index `r - 1`. Other ranks: the stream to rank 0.
    streams: Vec<TcpStream>,
    /// The first failure, after which every call fails at once.
    broken: Mutex<Option<String>>,
}

impl std::fmt::Debug for TcpComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpComm")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

fn io_err(rank: usize, addr: &str, context: &str, source: std::io::Error) -> CommError {
    CommError::Io {
        rank,
        addr: addr.to_string(),
        context: context.to_string(),
        source,
    }
}

impl TcpComm {
    /// Connects `count` communicators of the same `world` ranks (each process calls this with
    /// its `rank`): rank 0 serves the rendezvous at `master` (`HOST:PORT`, an address of rank
    /// 0's machine every rank can reach) and listens on one more port of that host per
    /// communicator; the others join and connect. `timeout` bounds the set-up and, later, every
    /// collective. With `world == 1` no socket is opened.
    pub fn connect_group(
        rank: usize,
        world: usize,
        master: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<TcpComm>, CommError> {
        Self::connect_group_sharing(rank, world, master, count, timeout, None).map(|(c, _)| c)
    }

    /// [`TcpComm::connect_group`], and rank 0's `shared` bytes (e.g. an NCCL unique id)
    /// handed to every rank in the same rendezvous round: every rank returns rank 0's
    /// `shared` (`None` when rank 0 passed `None`; the other ranks' argument is ignored).
    pub fn connect_group_sharing(
        rank: usize,
        world: usize,
        master: &str,
        count: usize,
        timeout: Duration,
        shared: Option<&[u8]>,
    ) -> Result<(Vec<TcpComm>, Option<Vec<u8>>), CommError> {
        if world == 0 || rank >= world {
            return Err(CommError::InvalidArgument {
                rank,
                op: "TcpComm::connect_group".into(),
                detail: format!("rank {rank} is not a rank of a group of {world}"),
            });
        }
        let make = |streams: Vec<TcpStream>| TcpComm {
            rank,
            world,
            timeout,
            streams,
            broken: Mutex::new(None),
        };
        if world == 1 {
            let comms = (0..count).map(|_| make(Vec::new())).collect();
            return Ok((comms, shared.map(<[u8]>::to_vec)));
        }
        let deadline = Instant::now() + timeout;
        if rank == 0 {
            let mut host: SocketAddr = master
                .to_socket_addrs()
                .map_err(|e| io_err(0, master, "resolving the master address", e))?
                .next()
                .ok_or_else(|| CommError::InvalidArgument {
                    rank: 0,
                    op: "TcpComm::connect_group".into(),
                    detail: format!("{master} resolves to no address"),
                })?;
            host.set_port(0);
            let mut listeners = Vec::with_capacity(count);
            let mut blob = String::new();
            for _ in 0..count {
                let l = TcpListener::bind(host)
                    .map_err(|e| io_err(0, &host.to_string(), "binding a data listener", e))?;
                let a = l
                    .local_addr()
                    .map_err(|e| io_err(0, &host.to_string(), "reading its address", e))?;
                blob.push_str(&a.to_string());
                blob.push('\n');
                listeners.push(l);
            }
            if let Some(bytes) = shared {
                blob.push_str(SHARED_PREFIX);
                for b in bytes {
                    blob.push_str(&format!("{b:02x}"));
                }
                blob.push('\n');
            }
            rendezvous(master, 0, world, Some(blob.into_bytes()), timeout)?;
            let mut out = Vec::with_capacity(count);
            for l in &listeners {
                out.push(make(accept_peers(l, world, deadline)?));
            }
            Ok((out, shared.map(<[u8]>::to_vec)))
        } else {
            let blob = rendezvous(master, rank, world, None, timeout)?;
            let text = String::from_utf8(blob).map_err(|_| CommError::InvalidArgument {
                rank,
                op: "TcpComm::connect_group".into(),
                detail: "rank 0 sent data addresses that are not text".into(),
            })?;
            let mut received = None;
            let mut addrs: Vec<&str> = Vec::with_capacity(count);
            for line in text.lines() {
                match line.strip_prefix(SHARED_PREFIX) {
                    Some(hex) => {
                        received =
                            Some(decode_hex(hex).ok_or_else(|| CommError::InvalidArgument {
                                rank,
                                op: "TcpComm::connect_group".into(),
                                detail: "rank 0 sent shared bytes that are not hex".into(),
                            })?)
                    }
                    None => addrs.push(line),
                }
            }
            if addrs.len() != count {
                return Err(CommError::InvalidArgument {
                    rank,
                    op: "TcpComm::connect_group".into(),
                    detail: format!(
                        "rank 0 listens for {} communicators, this rank asked for {count}",
                        addrs.len()
                    ),
                });
            }
            let mut out = Vec::with_capacity(count);
            for a in addrs {
                out.push(make(vec![connect_to_root(a, rank, world, deadline)?]));
            }
            Ok((out, received))
        }
    }

    /// The timeout of every collective.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sets the timeout of later collectives (the set-up may use a shorter one).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    fn check_broken(&self, op: &str) -> Result<(), CommError> {
        let b = self.broken.lock().unwrap_or_else(|p| p.into_inner());
        match &*b {
            Some(reason) => Err(CommError::GroupBroken {
                rank: self.rank,
                op: op.into(),
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    fn mark_broken(&self, reason: String) {
        let mut b = self.broken.lock().unwrap_or_else(|p| p.into_inner());
        b.get_or_insert(reason);
    }

    /// Runs one collective. `mine` is this rank's contribution; `combine` (rank 0 only) turns
    /// the contributions of ranks 0..N (in rank order) into the result every rank receives;
    /// `result` receives it (on rank 0 too).
    fn exchange(
        &self,
        header: Header,
        mine: &[u8],
        combine: impl FnOnce(&[&[u8]]) -> Result<Vec<u8>, String>,
        result: &mut [u8],
    ) -> Result<(), CommError> {
        let kind = match header.kind {
            1 => Kind::AllReduce,
            2 => Kind::ReduceScatter,
            3 => Kind::AllGather,
            4 => Kind::Broadcast,
            _ => Kind::Barrier,
        };
        let op = kind.name();
        self.check_broken(op)?;
        let started = Instant::now();
        let r = if self.rank == 0 {
            self.exchange_root(header, mine, combine, result, op, started)
        } else {
            self.exchange_peer(header, mine, result, op, started)
        };
        if let Err(e) = &r {
            self.mark_broken(e.to_string());
        }
        r
    }

    fn exchange_root(
        &self,
        header: Header,
        mine: &[u8],
        combine: impl FnOnce(&[&[u8]]) -> Result<Vec<u8>, String>,
        result: &mut [u8],
        op: &str,
        started: Instant,
    ) -> Result<(), CommError> {
        let mut bufs: Vec<Vec<u8>> = Vec::with_capacity(self.world - 1);
        let mut failure: Option<CommError> = None;
        for (i, s) in self.streams.iter().enumerate() {
            let peer = i + 1;
            match self.receive_contribution(s, peer, &header, op, started) {
                Ok(b) => bufs.push(b),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let outcome = match failure {
            Some(e) => Err(e),
            None => {
                let mut all: Vec<&[u8]> = Vec::with_capacity(self.world);
                all.push(mine);
                all.extend(bufs.iter().map(Vec::as_slice));
                combine(&all).map_err(|detail| CommError::InvalidArgument {
                    rank: 0,
                    op: op.into(),
                    detail,
                })
            }
        };
        match outcome {
            Ok(out) => {
                for (i, s) in self.streams.iter().enumerate() {
                    self.send_answer(s, 0, &out, i + 1, op)?;
                }
                if result.len() != out.len() {
                    return Err(CommError::InvalidArgument {
                        rank: 0,
                        op: op.into(),
                        detail: format!(
                            "the result has {} bytes, the buffer {}",
                            out.len(),
                            result.len()
                        ),
                    });
                }
                result.copy_from_slice(&out);
                Ok(())
            }
            Err(e) => {
                // Tell every peer still there why, so that none waits for its timeout.
                let msg = e.to_string();
                for s in &self.streams {
                    let _ = write_message(s, 1, msg.as_bytes(), self.timeout);
                }
                Err(e)
            }
        }
    }

    fn receive_contribution(
        &self,
        s: &TcpStream,
        peer: usize,
        header: &Header,
        op: &str,
        started: Instant,
    ) -> Result<Vec<u8>, CommError> {
        let mut hb = [0u8; HEADER_LEN];
        self.read_from(s, &mut hb, peer, op, started)?;
        let theirs = Header::decode(&hb);
        if !theirs.same_collective(header) {
            return Err(CommError::Mismatch {
                rank: 0,
                op: op.into(),
                detail: format!(
                    "rank 0: {}; rank {peer}: {}",
                    header.describe(),
                    theirs.describe()
                ),
            });
        }
        let mut b = vec![0u8; theirs.payload as usize];
        self.read_from(s, &mut b, peer, op, started)?;
        Ok(b)
    }

    fn exchange_peer(
        &self,
        header: Header,
        mine: &[u8],
        result: &mut [u8],
        op: &str,
        started: Instant,
    ) -> Result<(), CommError> {
        let s = &self.streams[0];
        let mut msg = Vec::with_capacity(HEADER_LEN + mine.len());
        msg.extend_from_slice(&header.encode());
        msg.extend_from_slice(mine);
        self.write_to(s, &msg, 0, op)?;
        let mut st = [0u8; 9];
        self.read_from(s, &mut st, 0, op, started)?;
        let len = u64::from_le_bytes(st[1..9].try_into().expect("8 bytes")) as usize;
        if st[0] != 0 {
            let mut m = vec![0u8; len.min(1 << 20)];
            self.read_from(s, &mut m, 0, op, started)?;
            return Err(CommError::GroupBroken {
                rank: self.rank,
                op: op.into(),
                reason: String::from_utf8_lossy(&m).into_owned(),
            });
        }
        if len != result.len() {
            return Err(CommError::InvalidArgument {
                rank: self.rank,
                op: op.into(),
                detail: format!(
                    "rank 0 sent {len} bytes, this rank's buffer holds {}",
                    result.len()
                ),
            });
        }
        self.read_from(s, result, 0, op, started)
    }

    fn send_answer(
        &self,
        s: &TcpStream,
        status: u8,
        payload: &[u8],
        peer: usize,
        op: &str,
    ) -> Result<(), CommError> {
        write_message(s, status, payload, self.timeout).map_err(|e| self.lost(peer, op, e))
    }

    fn write_to(
        &self,
        s: &TcpStream,
        bytes: &[u8],
        peer: usize,
        op: &str,
    ) -> Result<(), CommError> {
        s.set_write_timeout(Some(self.timeout))
            .and_then(|_| (&*s).write_all(bytes))
            .map_err(|e| self.lost(peer, op, e))
    }

    fn read_from(
        &self,
        s: &TcpStream,
        buf: &mut [u8],
        peer: usize,
        op: &str,
        started: Instant,
    ) -> Result<(), CommError> {
        let deadline = started + self.timeout;
        let mut got = 0;
        while got < buf.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(CommError::Timeout {
                    rank: self.rank,
                    op: op.into(),
                    waited: started.elapsed(),
                    missing: vec![peer],
                });
            }
            s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .map_err(|e| self.lost(peer, op, e))?;
            match (&*s).read(&mut buf[got..]) {
                Ok(0) => {
                    return Err(CommError::GroupBroken {
                        rank: self.rank,
                        op: op.into(),
                        reason: format!("rank {peer} closed its connection (it exited or failed)"),
                    });
                }
                Ok(n) => got += n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(self.lost(peer, op, e)),
            }
        }
        Ok(())
    }

    fn lost(&self, peer: usize, op: &str, e: std::io::Error) -> CommError {
        CommError::GroupBroken {
            rank: self.rank,
            op: op.into(),
            reason: format!("the connection with rank {peer} failed: {e}"),
        }
    }

    fn invalid(&self, op: &str, detail: String) -> CommError {
        CommError::InvalidArgument {
            rank: self.rank,
            op: op.into(),
            detail,
        }
    }
}

fn write_message(
    s: &TcpStream,
    status: u8,
    payload: &[u8],
    timeout: Duration,
) -> std::io::Result<()> {
    s.set_write_timeout(Some(timeout))?;
    let mut msg = Vec::with_capacity(9 + payload.len());
    msg.push(status);
    msg.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    msg.extend_from_slice(payload);
    (&*s).write_all(&msg)
}

/// Rank 0: accepts one connection from each of ranks `1..world` on `l`.
fn accept_peers(
    l: &TcpListener,
    world: usize,
    deadline: Instant,
) -> Result<Vec<TcpStream>, CommError> {
    let addr = l
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    l.set_nonblocking(true)
        .map_err(|e| io_err(0, &addr, "making the data listener non-blocking", e))?;
    let mut peers: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
    let mut joined = 0;
    while joined < world - 1 {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)
                    .map_err(|e| io_err(0, &addr, "configuring a peer connection", e))?;
                s.set_read_timeout(Some(
                    deadline
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(1)),
                ))
                .map_err(|e| io_err(0, &addr, "configuring a peer connection", e))?;
                let mut hello = [0u8; 16];
                if (&s).read_exact(&mut hello).is_err() || &hello[..8] != HELLO {
                    continue;
                }
                let r = u32::from_le_bytes(hello[8..12].try_into().expect("4 bytes")) as usize;
                let w = u32::from_le_bytes(hello[12..16].try_into().expect("4 bytes")) as usize;
                if w != world || r == 0 || r >= world || peers[r - 1].is_some() {
                    return Err(CommError::InvalidArgument {
                        rank: 0,
                        op: "TcpComm::connect_group".into(),
                        detail: format!(
                            "a peer says it is rank {r} of {w}; this group has {world} ranks"
                        ),
                    });
                }
                let _ = s.set_nodelay(true);
                peers[r - 1] = Some(s);
                joined += 1;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<usize> = peers
                        .iter()
                        .enumerate()
                        .filter(|(_, p)| p.is_none())
                        .map(|(i, _)| i + 1)
                        .collect();
                    return Err(CommError::Timeout {
                        rank: 0,
                        op: "TcpComm::connect_group".into(),
                        waited: Duration::ZERO,
                        missing,
                    });
                }
                std::thread::sleep(CONNECT_RETRY);
            }
            Err(e) => return Err(io_err(0, &addr, "accepting a peer", e)),
        }
    }
    Ok(peers.into_iter().flatten().collect())
}

/// A peer: connects to rank 0's data listener at `addr` and says who it is.
fn connect_to_root(
    addr: &str,
    rank: usize,
    world: usize,
    deadline: Instant,
) -> Result<TcpStream, CommError> {
    loop {
        match TcpStream::connect(addr) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                let mut hello = [0u8; 16];
                hello[..8].copy_from_slice(HELLO);
                hello[8..12].copy_from_slice(&(rank as u32).to_le_bytes());
                hello[12..16].copy_from_slice(&(world as u32).to_le_bytes());
                (&s).write_all(&hello)
                    .map_err(|e| io_err(rank, addr, "introducing this rank to rank 0", e))?;
                return Ok(s);
            }
            Err(e) if Instant::now() >= deadline => {
                return Err(io_err(
                    rank,
                    addr,
                    "connecting to rank 0's data listener",
                    e,
                ));
            }
            Err(_) => std::thread::sleep(CONNECT_RETRY),
        }
    }
}

fn header<T: CommElement>(
    kind: Kind,
    total: usize,
    op: Option<ReduceOp>,
    root: usize,
    payload: usize,
) -> Header {
    raw_header(kind, std::mem::size_of::<T>(), total, op, root, payload)
}

fn raw_header(
    kind: Kind,
    elem: usize,
    total: usize,
    op: Option<ReduceOp>,
    root: usize,
    payload: usize,
) -> Header {
    Header {
        kind: kind as u8,
        elem: elem as u8,
        op: op.map_or(0, op_code),
        root: root as u32,
        total: total as u64,
        payload: payload as u64,
    }
}

/// Reduces the ranks' byte images of `len` elements of `T`, in rank order.
fn reduce_bytes<T: CommElement>(
    all: &[&[u8]],
    len: usize,
    op: ReduceOp,
) -> Result<Vec<u8>, String> {
    let mut vals: Vec<Vec<T>> = Vec::with_capacity(all.len());
    for (r, b) in all.iter().enumerate() {
        if b.len() != len * std::mem::size_of::<T>() {
            return Err(format!(
                "rank {r} sent {} bytes for {len} elements of {}",
                b.len(),
                T::DTYPE
            ));
        }
        let mut v = vec![T::default(); len];
        as_bytes_mut(&mut v).copy_from_slice(b);
        vals.push(v);
    }
    let ins: Vec<&[T]> = vals.iter().map(Vec::as_slice).collect();
    let mut out = vec![T::default(); len];
    T::reduce(&ins, op, &mut out);
    Ok(as_bytes(&out).to_vec())
}

impl TcpComm {
    fn reduce_into<T: CommElement>(
        &self,
        buf: &[T],
        op: ReduceOp,
        kind: Kind,
    ) -> Result<Vec<T>, CommError> {
        let total = buf.len();
        let mut out = vec![T::default(); total];
        if self.world == 1 {
            out.copy_from_slice(buf);
            return Ok(out);
        }
        let h = header::<T>(kind, total, Some(op), 0, std::mem::size_of_val(buf));
        self.exchange(
            h,
            as_bytes(buf),
            |all| reduce_bytes::<T>(all, total, op),
            as_bytes_mut(&mut out),
        )?;
        Ok(out)
    }

    fn gather_into<T: CommElement>(
        &self,
        input: &[T],
        output: &mut [T],
        even: bool,
    ) -> Result<(), CommError> {
        let (world, total) = (self.world, output.len());
        let name = if even {
            "all_gather"
        } else {
            "all_gather_uneven"
        };
        if even && input.len() * world != total {
            return Err(self.invalid(
                name,
                format!(
                    "input has {} elements, output {total}; all_gather needs output = world \
                     size ({world}) x input",
                    input.len()
                ),
            ));
        }
        let mine = shard_range(total, world, self.rank);
        if input.len() != mine.len() {
            return Err(self.invalid(
                name,
                format!(
                    "input has {} elements but rank {}'s shard of {total} is {mine:?}",
                    input.len(),
                    self.rank
                ),
            ));
        }
        if world == 1 {
            output.copy_from_slice(input);
            return Ok(());
        }
        let h = header::<T>(
            Kind::AllGather,
            total,
            None,
            0,
            std::mem::size_of_val(input),
        );
        let size = std::mem::size_of::<T>();
        self.exchange(
            h,
            as_bytes(input),
            |all| {
                let mut out = Vec::with_capacity(total * size);
                for (r, b) in all.iter().enumerate() {
                    let want = shard_range(total, world, r).len() * size;
                    if b.len() != want {
                        return Err(format!(
                            "rank {r} sent {} bytes, its shard is {want}",
                            b.len()
                        ));
                    }
                    out.extend_from_slice(b);
                }
                Ok(out)
            },
            as_bytes_mut(output),
        )
    }

    fn scatter_reduce<T: CommElement>(
        &self,
        input: &[T],
        output: &mut [T],
        op: ReduceOp,
        even: bool,
    ) -> Result<(), CommError> {
        let (world, total) = (self.world, input.len());
        let name = if even {
            "reduce_scatter"
        } else {
            "reduce_scatter_uneven"
        };
        if even && (!total.is_multiple_of(world) || output.len() * world != total) {
            return Err(self.invalid(
                name,
                format!(
                    "input has {total} elements, output {}; reduce_scatter needs input = world \
                     size ({world}) x output",
                    output.len()
                ),
            ));
        }
        let mine = shard_range(total, world, self.rank);
        if output.len() != mine.len() {
            return Err(self.invalid(
                name,
                format!(
                    "output has {} elements but rank {}'s shard of {total} is {mine:?}",
                    output.len(),
                    self.rank
                ),
            ));
        }
        // The whole reduction comes back and each rank keeps its shard: the same element-wise
        // fold as a reduce-scatter, at twice the traffic.
        let full = self.reduce_into(input, op, Kind::ReduceScatter)?;
        output.copy_from_slice(&full[mine]);
        Ok(())
    }
}

impl Communicator for TcpComm {
    type Buf<T: CommElement> = [T];

    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce<T: CommElement>(&self, buf: &mut [T], op: ReduceOp) -> Result<(), CommError> {
        let out = self.reduce_into(buf, op, Kind::AllReduce)?;
        buf.copy_from_slice(&out);
        Ok(())
    }

    fn reduce_scatter<T: CommElement>(
        &self,
        input: &[T],
        output: &mut [T],
        op: ReduceOp,
    ) -> Result<(), CommError> {
        self.scatter_reduce(input, output, op, true)
    }

    fn reduce_scatter_uneven<T: CommElement>(
        &self,
        input: &[T],
        output: &mut [T],
        op: ReduceOp,
    ) -> Result<(), CommError> {
        self.scatter_reduce(input, output, op, false)
    }

    fn all_gather<T: CommElement>(&self, input: &[T], output: &mut [T]) -> Result<(), CommError> {
        self.gather_into(input, output, true)
    }

    fn all_gather_uneven<T: CommElement>(
        &self,
        input: &[T],
        output: &mut [T],
    ) -> Result<(), CommError> {
        self.gather_into(input, output, false)
    }

    fn broadcast<T: CommElement>(&self, buf: &mut [T], root: usize) -> Result<(), CommError> {
        if root >= self.world {
            return Err(self.invalid(
                "broadcast",
                format!("root {root} is not a rank of a group of {}", self.world),
            ));
        }
        if self.world == 1 {
            return Ok(());
        }
        let total = buf.len();
        let mine: Vec<u8> = if self.rank == root {
            as_bytes(buf).to_vec()
        } else {
            Vec::new()
        };
        let h = header::<T>(Kind::Broadcast, total, None, root, mine.len());
        let want = std::mem::size_of_val(buf);
        self.exchange(
            h,
            &mine,
            |all| {
                let b = all[root];
                if b.len() != want {
                    return Err(format!(
                        "root {root} sent {} bytes, expected {want}",
                        b.len()
                    ));
                }
                Ok(b.to_vec())
            },
            as_bytes_mut(buf),
        )
    }

    fn barrier(&self) -> Result<(), CommError> {
        if self.world == 1 {
            return Ok(());
        }
        let h = raw_header(Kind::Barrier, 0, 0, None, 0, 0);
        self.exchange(h, &[], |_| Ok(Vec::new()), &mut [])
    }
}
