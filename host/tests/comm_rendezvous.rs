//! The TCP rendezvous on loopback: blob exchange, barrier reuse, timeouts and misconfiguration.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use lathe_host::comm::{CommError, RendezvousServer, rendezvous, rendezvous_join};

const LOOPBACK_ANY_PORT: &str = "127.0.0.1:0";

/// A loopback address whose port was free a moment ago.
fn free_addr() -> String {
    let l = TcpListener::bind(LOOPBACK_ANY_PORT).expect("bind loopback");
    let addr = l.local_addr().expect("local addr").to_string();
    drop(l);
    addr
}

#[test]
fn three_ranks_receive_rank_zeros_blob() {
    let addr = free_addr();
    let blob: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
    let results: Vec<Result<Vec<u8>, CommError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                let addr = addr.clone();
                let mine = if rank == 0 {
                    Some(blob.clone())
                } else {
                    Some(vec![9; 3])
                };
                s.spawn(move || {
                    // Peers may start before rank 0 listens; they retry until it does.
                    if rank == 0 {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    rendezvous(&addr, rank, 3, mine, Duration::from_secs(5))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    for (rank, r) in results.into_iter().enumerate() {
        assert_eq!(
            r.unwrap_or_else(|e| panic!("rank {rank}: {e}")),
            blob,
            "rank {rank}"
        );
    }
}

#[test]
fn one_server_serves_several_rounds() {
    let server = RendezvousServer::bind(LOOPBACK_ANY_PORT).expect("bind");
    let addr = server.local_addr().to_string();
    std::thread::scope(|s| {
        let peers: Vec<_> = (1..4)
            .map(|rank| {
                let addr = addr.clone();
                s.spawn(move || {
                    (0..3u8)
                        .map(|round| {
                            rendezvous_join(&addr, rank, 4, Duration::from_secs(5))
                                .unwrap_or_else(|e| panic!("rank {rank} round {round}: {e}"))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for round in 0..3u8 {
            server
                .serve(4, &[round, 42], Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
        }
        for p in peers {
            let got = p.join().expect("peer thread");
            assert_eq!(got, vec![vec![0, 42], vec![1, 42], vec![2, 42]]);
        }
    });
}

#[test]
fn missing_peer_is_a_timeout_on_rank_zero_and_an_error_on_the_others() {
    let server = RendezvousServer::bind(LOOPBACK_ANY_PORT).expect("bind");
    let addr = server.local_addr().to_string();
    let started = Instant::now();
    let (served, joined) = std::thread::scope(|s| {
        let peer = s.spawn(|| rendezvous_join(&addr, 1, 3, Duration::from_secs(4)));
        let served = server.serve(3, b"id", Duration::from_millis(1000));
        (served, peer.join().expect("peer thread"))
    });
    // The peer learns of the failure from rank 0, well before its own deadline.
    assert!(
        started.elapsed() < Duration::from_millis(3500),
        "{:?}",
        started.elapsed()
    );
    match served.expect_err("rank 2 never joins") {
        CommError::Timeout { missing, .. } => assert_eq!(missing, vec![2]),
        other => panic!("unexpected {other}"),
    }
    let e = joined.expect_err("rank 0 gave up");
    assert!(e.to_string().contains("never joined"), "{e}");
}

#[test]
fn unreachable_rank_zero_is_a_timeout() {
    let addr = free_addr();
    let started = Instant::now();
    let e = rendezvous(&addr, 2, 3, None, Duration::from_millis(300)).expect_err("nobody listens");
    assert!(started.elapsed() < Duration::from_secs(3));
    match e {
        CommError::Timeout { missing, rank, .. } => {
            assert_eq!(missing, vec![0]);
            assert_eq!(rank, 2);
        }
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn world_size_disagreement_fails_everyone() {
    let server = RendezvousServer::bind(LOOPBACK_ANY_PORT).expect("bind");
    let addr = server.local_addr().to_string();
    let (served, joined) = std::thread::scope(|s| {
        let peer = s.spawn(|| rendezvous_join(&addr, 1, 4, Duration::from_secs(3)));
        let served = server.serve(3, b"id", Duration::from_secs(3));
        (served, peer.join().expect("peer thread"))
    });
    let e = served.expect_err("mismatch");
    assert!(matches!(e, CommError::Rendezvous { .. }), "{e}");
    assert!(e.to_string().contains("world size 4"), "{e}");
    let e = joined.expect_err("mismatch");
    assert!(e.to_string().contains("world size 4"), "{e}");
}

#[test]
fn bad_arguments_are_errors() {
    assert!(matches!(
        rendezvous("127.0.0.1:1", 3, 3, None, Duration::from_millis(10)),
        Err(CommError::InvalidArgument { .. })
    ));
    // A single rank needs no peers and binds nothing.
    assert_eq!(
        rendezvous(
            "127.0.0.1:1",
            0,
            1,
            Some(vec![1, 2]),
            Duration::from_millis(10)
        )
        .expect("world of one"),
        vec![1, 2]
    );
}
