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
