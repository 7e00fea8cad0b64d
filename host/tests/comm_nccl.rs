//! The NCCL communicator: a clear error without the libraries, a one-rank run with them.

use lathe_host::comm::{CommError, Communicator, Nccl, NcclId, ReduceOp, nccl_available};

fn gpu_required() -> bool {
    std::env::var("LATHE_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

#[test]
fn id_bytes_round_trip_and_length_is_checked() {
    let bytes: Vec<u8> = (0..NcclId::LEN as u8).collect();
    let id = NcclId::from_bytes(&bytes).expect("128 bytes");
    assert_eq!(id.as_bytes().as_slice(), bytes.as_slice());
    match NcclId::from_bytes(&bytes[..100]) {
        Err(CommError::InvalidNcclId { expected, got }) => {
            assert_eq!((expected, got), (128, 100));
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn nccl_without_libraries_is_an_error_naming_the_library() {
    let Err(missing) = nccl_available() else {
        return; // The libraries are here: the one-rank test below covers this machine.
    };
    assert!(!gpu_required(), "LATHE_REQUIRE_GPU=1 but {missing}");
    let CommError::LibraryMissing { library, .. } = &missing else {
        panic!("unexpected {missing}");
    };
    assert!(
        library.contains("libcuda") || library.contains("libnccl"),
        "{missing}"
    );
    assert!(
        missing.to_string().contains("could not be loaded"),
        "{missing}"
    );

    let e = NcclId::new().expect_err("no NCCL");
    assert!(matches!(e, CommError::LibraryMissing { .. }), "{e}");
    let id = NcclId::from_bytes(&[0u8; NcclId::LEN]).expect("bytes");
    let e = Nccl::on_device(0, 0, 1, &id).expect_err("no NCCL");
    assert!(matches!(e, CommError::LibraryMissing { .. }), "{e}");
}

#[test]
fn one_rank_collectives_on_the_gpu() {
    if let Err(e) = nccl_available() {
        assert!(!gpu_required(), "LATHE_REQUIRE_GPU=1 but {e}");
        eprintln!("skipping: {e}");
        return;
    }
    let id = NcclId::new().expect("unique id");
    let nccl = match Nccl::on_device(0, 0, 1, &id) {
        Ok(n) => n,
        Err(e) => {
            assert!(!gpu_required(), "LATHE_REQUIRE_GPU=1 but {e}");
            eprintln!("skipping: {e}");
            return;
        }
    };
    let stream = nccl.stream().clone();
    let host: Vec<f32> = (0..37).map(|i| i as f32 * 0.5 - 3.0).collect();
    let mut buf = stream.clone_htod(&host).expect("upload");
    Communicator::all_reduce(&nccl, &mut buf, ReduceOp::Avg).expect("all_reduce");
    let mut out = stream.alloc_zeros::<f32>(37).expect("alloc");
    nccl.reduce_scatter_uneven(&buf, &mut out, ReduceOp::Sum)
        .expect("reduce_scatter");
    let mut gathered = stream.alloc_zeros::<f32>(37).expect("alloc");
    nccl.all_gather_uneven(&out, &mut gathered)
        .expect("all_gather");
    nccl.broadcast(&mut gathered, 0).expect("broadcast");
    nccl.barrier().expect("barrier");
    let back = stream.clone_dtoh(&gathered).expect("download");
    assert_eq!(back, host);
}

/// A loopback address whose port was free a moment ago.
fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = l.local_addr().expect("local addr").to_string();
    drop(l);
    addr
}

/// A fake id: any 128 bytes travel; no NCCL library is needed to hand them out.
fn fake_id() -> NcclId {
    let bytes: Vec<u8> = (0..NcclId::LEN).map(|i| (i * 37 + 11) as u8).collect();
    NcclId::from_bytes(&bytes).expect("128 bytes")
}

#[test]
fn rank_zeros_id_reaches_every_rank_through_the_rendezvous() {
    let addr = free_addr();
    let id = fake_id();
    let got: Vec<NcclId> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..3)
            .map(|rank| {
                let addr = addr.clone();
                s.spawn(move || {
                    let mine = (rank == 0).then_some(&id);
                    NcclId::exchange(&addr, rank, 3, mine, std::time::Duration::from_secs(20))
                        .unwrap_or_else(|e| panic!("rank {rank}: {e}"))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    assert!(got.iter().all(|g| g.as_bytes() == id.as_bytes()), "{got:?}");
    let e = NcclId::exchange(&addr, 0, 1, None, std::time::Duration::from_secs(1))
        .expect_err("rank 0 without an id");
    assert!(matches!(e, CommError::InvalidArgument { .. }), "{e}");
}

#[test]
fn the_tcp_group_set_up_carries_rank_zeros_id_to_every_process_rank() {
    use lathe_host::comm::TcpComm;
    for with_id in [true, false] {
        let addr = free_addr();
        let id = fake_id();
        let got: Vec<Option<Vec<u8>>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..3)
                .map(|rank| {
                    let addr = addr.clone();
                    s.spawn(move || {
                        // Other ranks' bytes are ignored: only rank 0's travel.
                        let shared = if rank == 0 && !with_id {
                            None
                        } else {
                            Some(id.as_bytes().as_slice())
                        };
                        let (comms, got) = TcpComm::connect_group_sharing(
                            rank,
                            3,
                            &addr,
                            2,
                            std::time::Duration::from_secs(20),
                            shared,
                        )
                        .unwrap_or_else(|e| panic!("rank {rank}: {e}"));
                        // The communicators work after the exchange.
                        let mut x = [rank as f32 + 1.0];
                        comms[1].all_reduce(&mut x[..], ReduceOp::Sum).unwrap();
                        assert_eq!(x[0], 6.0);
                        comms[0].barrier().unwrap();
                        got
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().expect("thread")).collect()
        });
        for (rank, g) in got.iter().enumerate() {
            match (with_id, g) {
                (true, Some(b)) => assert_eq!(b.as_slice(), id.as_bytes(), "rank {rank}"),
                (false, None) => {}
                _ => panic!("rank {rank} (id sent: {with_id}) got {g:?}"),
            }
        }
    }
}
