//! `TcpComm`: ranks as processes over TCP (here threads of the test, each with its own
//! sockets) compute what `LocalComm`'s in-process ranks compute, bit for bit; a rank that goes
//! away makes the others fail with an error naming it, within the timeout.

use half::bf16;
use lathe_host::comm::{
    CommError, Communicator, HostComm, LocalGroup, ReduceOp, TcpComm, shard_range,
};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn values(rank: usize, n: usize) -> Vec<f32> {
    // Fresh, non-trivial values whose sums round differently in different orders.
    (0..n)
        .map(|i| {
            let x = ((i * 7919 + rank * 104_729) % 1000) as f32;
            (x - 500.0) * 1.000_123_4e-3 + (rank as f32 + 1.0) * 1e-7
        })
        .collect()
}

/// Runs `f` on every rank of a group of `world`, with TCP or in-process communicators.
fn on_ranks<R: Send>(world: usize, tcp: bool, f: impl Fn(HostComm) -> R + Sync) -> Vec<R> {
    let master = format!("127.0.0.1:{}", free_port());
    let locals = if tcp {
        Vec::new()
    } else {
        LocalGroup::new(world)
    };
    let mut locals: Vec<Option<_>> = locals.into_iter().map(Some).collect();
    std::thread::scope(|s| {
        let mut hs = Vec::new();
        for r in 0..world {
            let local = locals.get_mut(r).and_then(Option::take);
            let (f, master) = (&f, master.clone());
            hs.push(s.spawn(move || {
                let comm: HostComm = match local {
                    Some(c) => c.into(),
                    None => TcpComm::connect_group(r, world, &master, 1, Duration::from_secs(20))
                        .unwrap()
                        .pop()
                        .unwrap()
                        .into(),
                };
                f(comm)
            }));
        }
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

type Results = (Vec<u32>, Vec<u16>, Vec<u32>, Vec<u32>, Vec<u32>, Vec<u32>);

fn exercise(comm: HostComm) -> Results {
    let (rank, world) = (comm.rank(), comm.world_size());
    let n = 1003;
    let mut avg = values(rank, n);
    comm.all_reduce(&mut avg, ReduceOp::Avg).unwrap();
    let mut half: Vec<bf16> = values(rank, n).iter().map(|&x| bf16::from_f32(x)).collect();
    comm.all_reduce(&mut half, ReduceOp::Sum).unwrap();
    let mut max = values(rank, 17);
    if rank == 1 {
        max[3] = f32::NAN;
    }
    comm.all_reduce(&mut max, ReduceOp::Max).unwrap();
    let mut shard = vec![0.0f32; shard_range(n, world, rank).len()];
    comm.reduce_scatter_uneven(&values(rank, n), &mut shard, ReduceOp::Sum)
        .unwrap();
    let mut gathered = vec![f32::NAN; n];
    let mine: Vec<f32> = values(rank, n)[shard_range(n, world, rank)].to_vec();
    comm.all_gather_uneven(&mine, &mut gathered).unwrap();
    let mut b = values(rank, 5);
    comm.broadcast(&mut b, world - 1).unwrap();
    comm.barrier().unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let mut all = bits(&gathered);
    all.extend(bits(&b));
    (
        bits(&avg),
        half.iter().map(|x| x.to_bits()).collect(),
        bits(&max),
        bits(&shard),
        all,
        vec![rank as u32],
    )
}

#[test]
fn three_processes_compute_what_three_threads_compute_bit_for_bit() {
    let tcp = on_ranks(3, true, exercise);
    let local = on_ranks(3, false, exercise);
    for (r, (t, l)) in tcp.iter().zip(&local).enumerate() {
        assert_eq!(t, l, "rank {r}: TCP and in-process results differ");
    }
    // Every rank got the same reduction; NaN propagated through Max.
    assert_eq!(tcp[0].0, tcp[2].0);
    assert!(f32::from_bits(tcp[1].2[3]).is_nan());
    // The broadcast came from rank 2.
    let b2: Vec<u32> = values(2, 5).iter().map(|x| x.to_bits()).collect();
    assert_eq!(tcp[0].4[1003..], b2[..]);
}

#[test]
fn one_rank_needs_no_socket_and_mismatches_are_errors() {
    let c = TcpComm::connect_group(0, 1, "unused:1", 2, Duration::from_secs(1)).unwrap();
    assert_eq!(c.len(), 2);
    let mut v = vec![1.5f32; 4];
    c[0].all_reduce(&mut v, ReduceOp::Avg).unwrap();
    assert_eq!(v, vec![1.5; 4]);
    // Two ranks calling different collectives: both fail, naming the mismatch.
    let errs = on_ranks(2, true, |comm| {
        let mut v = vec![1.0f32; 8 + comm.rank()];
        comm.all_reduce(&mut v, ReduceOp::Sum)
            .unwrap_err()
            .to_string()
    });
    assert!(
        errs[0].contains("mismatched") || errs[0].contains("rank 1"),
        "{errs:?}"
    );
    assert!(errs[1].contains("broken"), "{errs:?}");
}

#[test]
fn a_rank_that_exits_stops_the_others_with_its_rank_named() {
    let started = Instant::now();
    let errs: Vec<Option<String>> = on_ranks(3, true, |comm| {
        let mut v = vec![1.0f32; 64];
        comm.all_reduce(&mut v, ReduceOp::Sum).unwrap();
        if comm.rank() == 2 {
            // Rank 2 goes away (its process exits: the sockets close).
            drop(comm);
            return None;
        }
        let e = comm.all_reduce(&mut v, ReduceOp::Sum).unwrap_err();
        assert!(matches!(e, CommError::GroupBroken { .. }), "{e}");
        // Later calls fail at once.
        let again = comm.barrier().unwrap_err().to_string();
        assert!(again.contains("broken"), "{again}");
        Some(e.to_string())
    });
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    for e in errs.iter().take(2) {
        let e = e.as_deref().unwrap();
        assert!(e.contains("rank 2"), "{e}");
    }
}

#[test]
fn a_missing_rank_is_a_timeout_naming_it() {
    let master = format!("127.0.0.1:{}", free_port());
    let started = Instant::now();
    // Rank 1 of 2 never starts.
    let e = TcpComm::connect_group(0, 2, &master, 1, Duration::from_millis(600)).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    let msg = e.to_string();
    assert!(msg.contains('1'), "{msg}");
}
