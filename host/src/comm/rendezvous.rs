//! A TCP rendezvous: rank 0 serves, the other ranks join, everyone leaves with rank 0's blob.
//!
//! Used to hand NCCL's unique id to every rank of a multi-process run and as a process-level
//! barrier (no rank gets the blob before every rank has joined). Plain `std::net`, blocking
//! sockets with deadlines: a missing or dead peer is an error after the timeout, never a hang.
//!
//! Wire format (integers little-endian):
//! - join, peer to rank 0: `b"LATHERV1"`, rank `u32`, world size `u32`;
//! - answer, rank 0 to peer: status `u8` (0 ok, 1 error), length `u64`, then that many bytes
//!   (the blob, or a UTF-8 message saying why the rendezvous failed).
//!
//! Rank 0 answers only after all `world - 1` peers have joined. Connections that do not start
//! with the magic bytes are ignored; a world-size disagreement or a duplicate rank fails the
//! rendezvous for everyone who joined, with a message naming the culprit.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::CommError;

const MAGIC: &[u8; 8] = b"LATHERV1";
const HELLO_LEN: usize = 16;
/// The largest blob a rendezvous carries (far above the 128 bytes of an NCCL id).
const MAX_BLOB: usize = 64 << 20;
/// How long rank 0 waits for the hello of one accepted connection.
const HELLO_WAIT: Duration = Duration::from_secs(5);
const ACCEPT_POLL: Duration = Duration::from_millis(5);
const CONNECT_RETRY: Duration = Duration::from_millis(25);
/// Deadlines are capped so that `Instant` arithmetic cannot overflow.
const LONGEST: Duration = Duration::from_secs(365 * 24 * 3600);

fn deadline_after(start: Instant, timeout: Duration) -> Instant {
    start + timeout.min(LONGEST)
}

/// Time left before `deadline`, at least one millisecond (socket timeouts must not be zero).
fn left(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

fn io_error(rank: usize, addr: &str, context: &str, source: io::Error) -> CommError {
    CommError::Io {
        rank,
        addr: addr.to_string(),
        context: context.to_string(),
        source,
    }
}

fn invalid(rank: usize, detail: String) -> CommError {
    CommError::InvalidArgument {
        rank,
        op: "rendezvous".to_string(),
        detail,
    }
}

fn write_answer(
    stream: &mut TcpStream,
    status: u8,
    payload: &[u8],
    deadline: Instant,
) -> io::Result<()> {
    stream.set_write_timeout(Some(left(deadline)))?;
    let mut msg = Vec::with_capacity(9 + payload.len());
    msg.push(status);
    msg.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    msg.extend_from_slice(payload);
    stream.write_all(&msg)?;
    stream.flush()
}

/// Rank 0's side of a rendezvous: a bound listener that can serve one or more rounds.
pub struct RendezvousServer {
    listener: TcpListener,
    addr: SocketAddr,
}

impl RendezvousServer {
    /// Binds the listener on `addr` (`HOST:PORT`; port 0 picks a free port, see
    /// [`RendezvousServer::local_addr`]).
    pub fn bind(addr: &str) -> Result<Self, CommError> {
        let listener = TcpListener::bind(addr)
            .map_err(|e| io_error(0, addr, "binding the rendezvous listener", e))?;
        let local = listener
            .local_addr()
            .map_err(|e| io_error(0, addr, "reading the listener's address", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| io_error(0, addr, "making the listener non-blocking", e))?;
        Ok(RendezvousServer {
            listener,
            addr: local,
        })
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves one round: waits until ranks `1..world` have joined, then sends each of them
    /// `blob`. Fails with [`CommError::Timeout`] (naming the ranks that never joined) if they
    /// have not all joined within `timeout`; the peers that did join are told why.
    pub fn serve(&self, world: usize, blob: &[u8], timeout: Duration) -> Result<(), CommError> {
        let addr = self.addr.to_string();
        if world == 0 || world > u32::MAX as usize {
            return Err(invalid(0, format!("world size {world} is out of range")));
        }
        if blob.len() > MAX_BLOB {
            return Err(invalid(
                0,
                format!(
                    "blob of {} bytes exceeds the {MAX_BLOB}-byte limit",
                    blob.len()
                ),
            ));
        }
        let started = Instant::now();
        let deadline = deadline_after(started, timeout);
        let mut peers: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        let mut joined = 1;
        while joined < world {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    let Some((stream, rank, their_world)) = read_hello(stream, deadline) else {
                        // Not a Lathe peer, or one that died before saying who it is.
                        continue;
                    };
                    let problem = if their_world != world {
                        Some(format!(
                            "rank {rank} was started with world size {their_world}, rank 0 with {world}"
                        ))
                    } else if rank == 0 || rank >= world {
                        Some(format!("a peer joined as rank {rank}, outside 1..{world}"))
                    } else if peers[rank].is_some() {
                        Some(format!("rank {rank} joined twice"))
                    } else {
                        None
                    };
                    if let Some(detail) = problem {
                        let mut all: Vec<TcpStream> = peers.into_iter().flatten().collect();
                        all.push(stream);
                        refuse(&mut all, &detail, deadline);
                        return Err(CommError::Rendezvous {
                            rank: 0,
                            addr,
                            detail,
                        });
                    }
                    peers[rank] = Some(stream);
                    joined += 1;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<usize> =
                            (1..world).filter(|&r| peers[r].is_none()).collect();
                        let detail = format!(
                            "rendezvous timed out after {timeout:?}: ranks {missing:?} never joined"
                        );
                        let mut all: Vec<TcpStream> = peers.into_iter().flatten().collect();
                        refuse(&mut all, &detail, Instant::now() + Duration::from_secs(1));
                        return Err(CommError::Timeout {
                            rank: 0,
                            op: format!("rendezvous at {addr}"),
                            waited: started.elapsed(),
                            missing,
                        });
                    }
                    std::thread::sleep(ACCEPT_POLL);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(io_error(0, &addr, "accepting a peer", e)),
            }
        }
        let answer_deadline = Instant::now() + timeout.min(LONGEST).max(Duration::from_secs(1));
        for (rank, stream) in peers.iter_mut().enumerate() {
            if let Some(stream) = stream {
                write_answer(stream, 0, blob, answer_deadline).map_err(|e| {
                    io_error(0, &addr, &format!("sending the blob to rank {rank}"), e)
                })?;
            }
        }
        Ok(())
    }
}

/// Reads a peer's hello; `None` if it is not a Lathe rendezvous peer or goes silent.
fn read_hello(mut stream: TcpStream, deadline: Instant) -> Option<(TcpStream, usize, usize)> {
    stream.set_nonblocking(false).ok()?;
    stream
        .set_read_timeout(Some(left(deadline).min(HELLO_WAIT)))
        .ok()?;
    let mut hello = [0u8; HELLO_LEN];
    stream.read_exact(&mut hello).ok()?;
    if &hello[..8] != MAGIC {
        return None;
    }
    let rank = u32::from_le_bytes([hello[8], hello[9], hello[10], hello[11]]) as usize;
    let world = u32::from_le_bytes([hello[12], hello[13], hello[14], hello[15]]) as usize;
    Some((stream, rank, world))
}

/// Tells every joined peer that the rendezvous failed (best effort: they may be gone already).
fn refuse(peers: &mut [TcpStream], detail: &str, deadline: Instant) {
    for stream in peers {
        let _ = write_answer(stream, 1, detail.as_bytes(), deadline);
    }
}

/// A non-zero rank's side: connects to rank 0 at `addr` (retrying until rank 0 listens), says
/// who it is, and returns rank 0's blob once every rank has joined.
///
/// Fails with [`CommError::Timeout`] if rank 0 cannot be reached or does not answer within
/// `timeout`, and with [`CommError::Rendezvous`] if rank 0 reports a failure.
pub fn rendezvous_join(
    addr: &str,
    rank: usize,
    world: usize,
    timeout: Duration,
) -> Result<Vec<u8>, CommError> {
    if world > u32::MAX as usize || rank == 0 || rank >= world {
        return Err(invalid(
            rank,
            format!("a joining rank must be in 1..{world}, got rank {rank}"),
        ));
    }
    let started = Instant::now();
    let deadline = deadline_after(started, timeout);
    let targets: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| io_error(rank, addr, "resolving the rendezvous address", e))?
        .collect();
    if targets.is_empty() {
        return Err(CommError::Rendezvous {
            rank,
            addr: addr.to_string(),
            detail: "the address resolves to nothing".to_string(),
        });
    }

    let mut last_error: Option<io::Error> = None;
    let mut stream = 'connect: loop {
        for target in &targets {
            match TcpStream::connect_timeout(target, left(deadline).min(Duration::from_secs(1))) {
                Ok(stream) => break 'connect stream,
                Err(e) => last_error = Some(e),
            }
        }
        if Instant::now() >= deadline {
            let why = last_error.map(|e| e.to_string()).unwrap_or_default();
            return Err(CommError::Timeout {
                rank,
                op: format!("rendezvous at {addr} (rank 0 unreachable: {why})"),
                waited: started.elapsed(),
                missing: vec![0],
            });
        }
        std::thread::sleep(CONNECT_RETRY.min(left(deadline)));
    };

    let mut hello = [0u8; HELLO_LEN];
    hello[..8].copy_from_slice(MAGIC);
    hello[8..12].copy_from_slice(&(rank as u32).to_le_bytes());
    hello[12..16].copy_from_slice(&(world as u32).to_le_bytes());
    stream
        .set_write_timeout(Some(left(deadline)))
        .and_then(|()| stream.write_all(&hello))
        .map_err(|e| io_error(rank, addr, "sending the join message", e))?;

    let waiting = |e: io::Error| -> CommError {
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => CommError::Timeout {
                rank,
                op: format!("rendezvous at {addr} (waiting for rank 0 to release it)"),
                waited: started.elapsed(),
                missing: Vec::new(),
            },
            ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset => CommError::Rendezvous {
                rank,
                addr: addr.to_string(),
                detail: "rank 0 closed the connection without answering (it failed or \
                         timed out)"
                    .to_string(),
            },
            _ => io_error(rank, addr, "reading rank 0's answer", e),
        }
    };
    stream
        .set_read_timeout(Some(left(deadline)))
        .map_err(|e| io_error(rank, addr, "setting the read timeout", e))?;
    let mut header = [0u8; 9];
    stream.read_exact(&mut header).map_err(waiting)?;
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&header[1..]);
    let len = u64::from_le_bytes(len_bytes);
    if len > MAX_BLOB as u64 {
        return Err(CommError::Rendezvous {
            rank,
            addr: addr.to_string(),
            detail: format!("rank 0 announced {len} bytes, more than the {MAX_BLOB}-byte limit"),
        });
    }
    let mut payload = vec![0u8; len as usize];
    stream.read_exact(&mut payload).map_err(waiting)?;
    match header[0] {
        0 => Ok(payload),
        1 => Err(CommError::Rendezvous {
            rank,
            addr: addr.to_string(),
            detail: format!("rank 0 reported: {}", String::from_utf8_lossy(&payload)),
        }),
        s => Err(CommError::Rendezvous {
            rank,
            addr: addr.to_string(),
            detail: format!("rank 0 answered with unknown status {s}"),
        }),
    }
}

/// Exchanges rank 0's `blob` among `world` ranks through `addr` (`HOST:PORT`) and returns it
/// on every rank; doubles as a barrier.
///
/// Rank 0 binds `addr` and serves (its `blob`, `None` meaning empty); the other ranks join
/// (their `blob` is ignored). With `world == 1` rank 0 returns at once without binding.
/// Every rank fails after `timeout` if a peer is missing, naming what it waited for.
pub fn rendezvous(
    addr: &str,
    rank: usize,
    world: usize,
    blob: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<Vec<u8>, CommError> {
    if rank >= world {
        return Err(invalid(
            rank,
            format!("rank {rank} is not a rank of a group of {world}"),
        ));
    }
    if rank == 0 {
        let blob = blob.unwrap_or_default();
        if world > 1 {
            RendezvousServer::bind(addr)?.serve(world, &blob, timeout)?;
        }
        Ok(blob)
    } else {
        rendezvous_join(addr, rank, world, timeout)
    }
}
