//! LocalGroup collectives against serial references, determinism, and failure handling.

use std::time::{Duration, Instant};

use half::bf16;
use lathe_host::comm::{
    CommElement, CommError, Communicator, LocalComm, LocalGroup, ReduceOp, shard_range,
};
use lathe_kernels::rng::Rng;

/// Runs `f(rank, endpoint)` on one thread per rank and returns the results in rank order.
fn run_group<R: Send>(
    world: usize,
    timeout: Duration,
    f: impl Fn(usize, LocalComm) -> R + Sync,
) -> Vec<R> {
    let comms = LocalGroup::with_timeout(world, timeout);
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| {
                let f = &f;
                s.spawn(move || f(rank, comm))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread panicked"))
            .collect()
    })
}

const T: Duration = Duration::from_secs(20);

/// Per-rank random inputs with mixed magnitudes (so summation order shows in the bits).
fn inputs(world: usize, len: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = Rng::new(seed);
    (0..world)
        .map(|r| {
            let mut rr = rng.fork(r as u64);
            (0..len)
                .map(|_| rr.range_f32(-1.0, 1.0) * 10f32.powi(rr.below(7) as i32 - 3))
                .collect()
        })
        .collect()
}

/// Serial reference: fold ranks in order, as documented for every communicator.
fn reference(data: &[Vec<f32>], range: std::ops::Range<usize>, op: ReduceOp) -> Vec<f32> {
    let n = data.len() as f32;
    range
        .map(|i| {
            let mut acc = data[0][i];
            for d in &data[1..] {
                acc = match op {
                    ReduceOp::Sum | ReduceOp::Avg => acc + d[i],
                    ReduceOp::Max => acc.max(d[i]),
                };
            }
            if op == ReduceOp::Avg { acc / n } else { acc }
        })
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

const LENS: [usize; 7] = [0, 1, 3, 7, 12, 37, 20_011];
const OPS: [ReduceOp; 3] = [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max];

#[test]
fn all_reduce_matches_serial_reference_bitwise() {
    for world in 1..=4 {
        for (li, &len) in LENS.iter().enumerate() {
            for op in OPS {
                let data = inputs(world, len, 100 + li as u64);
                let out = run_group(world, T, |rank, comm| {
                    let mut buf = data[rank].clone();
                    comm.all_reduce(&mut buf, op).map(|()| buf)
                });
                let want = bits(&reference(&data, 0..len, op));
                for (rank, got) in out.into_iter().enumerate() {
                    let got = got.unwrap_or_else(|e| panic!("world {world} len {len}: {e}"));
                    assert_eq!(bits(&got), want, "world {world} len {len} {op} rank {rank}");
                }
            }
        }
    }
}

#[test]
fn reduce_scatter_even_and_uneven_match_reference() {
    for world in 1..=4 {
        for (li, &len) in LENS.iter().enumerate() {
            for op in OPS {
                let data = inputs(world, len, 200 + li as u64);
                let even = len % world == 0;
                let out = run_group(world, T, |rank, comm| {
                    let mut shard = vec![f32::NAN; shard_range(len, world, rank).len()];
                    let r = if even && rank % 2 == 0 {
                        comm.reduce_scatter(&data[rank], &mut shard, op)
                    } else {
                        comm.reduce_scatter_uneven(&data[rank], &mut shard, op)
                    };
                    r.map(|()| shard)
                });
                for (rank, got) in out.into_iter().enumerate() {
                    let got = got.unwrap_or_else(|e| panic!("world {world} len {len}: {e}"));
                    let want = reference(&data, shard_range(len, world, rank), op);
                    assert_eq!(
                        bits(&got),
                        bits(&want),
                        "world {world} len {len} rank {rank}"
                    );
                }
            }
        }
    }
}

#[test]
fn all_gather_even_and_uneven_match_reference() {
    for world in 1..=4 {
        for (li, &len) in LENS.iter().enumerate() {
            let full = inputs(1, len, 300 + li as u64).remove(0);
            let even = len % world == 0;
            let out = run_group(world, T, |rank, comm| {
                let mine = &full[shard_range(len, world, rank)];
                let mut gathered = vec![f32::NAN; len];
                let r = if even {
                    comm.all_gather(mine, &mut gathered)
                } else {
                    comm.all_gather_uneven(mine, &mut gathered)
                };
                r.map(|()| gathered)
            });
            for (rank, got) in out.into_iter().enumerate() {
                let got = got.unwrap_or_else(|e| panic!("world {world} len {len}: {e}"));
                assert_eq!(
                    bits(&got),
                    bits(&full),
                    "world {world} len {len} rank {rank}"
                );
            }
        }
    }
}

#[test]
fn broadcast_from_every_root_and_barrier() {
    for world in 1..=4 {
        for root in 0..world {
            let data = inputs(world, 37, 400 + root as u64);
            let out = run_group(world, T, |rank, comm| {
                let mut buf = data[rank].clone();
                comm.broadcast(&mut buf, root)?;
                comm.barrier()?;
                Ok::<_, CommError>(buf)
            });
            for (rank, got) in out.into_iter().enumerate() {
                let got = got.unwrap_or_else(|e| panic!("world {world} root {root}: {e}"));
                assert_eq!(
                    bits(&got),
                    bits(&data[root]),
                    "world {world} root {root} rank {rank}"
                );
            }
        }
    }
}

/// bf16 sums accumulate in f32 and round once; f64 folds in rank order like f32.
fn typed_all_reduce<E: CommElement>(world: usize, data: &[Vec<E>], op: ReduceOp) -> Vec<Vec<E>> {
    run_group(world, T, |rank, comm| {
        let mut buf = data[rank].clone();
        comm.all_reduce(&mut buf, op).expect("all_reduce");
        buf
    })
}

#[test]
fn half_and_double_precision_all_reduce() {
    let world = 3;
    let data = inputs(world, 515, 500);
    let halves: Vec<Vec<bf16>> = data
        .iter()
        .map(|d| d.iter().map(|&x| bf16::from_f32(x)).collect())
        .collect();
    let widened: Vec<Vec<f32>> = halves
        .iter()
        .map(|d| d.iter().map(|x| x.to_f32()).collect())
        .collect();
    for op in OPS {
        let want: Vec<bf16> = reference(&widened, 0..515, op)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        for got in typed_all_reduce(world, &halves, op) {
            assert_eq!(got, want, "bf16 {op}");
        }
    }
    let doubles: Vec<Vec<f64>> = data
        .iter()
        .map(|d| d.iter().map(|&x| x as f64 * 1.1).collect())
        .collect();
    let want: Vec<f64> = (0..515)
        .map(|i| (doubles[0][i] + doubles[1][i]) + doubles[2][i])
        .collect();
    for got in typed_all_reduce(world, &doubles, ReduceOp::Sum) {
        assert_eq!(got, want);
    }
}

#[test]
fn results_are_bitwise_identical_across_runs_and_schedules() {
    let world = 4;
    let len = 50_000;
    let data = inputs(world, len, 600);
    let mut runs = Vec::new();
    for run in 0..4u64 {
        let out = run_group(world, T, |rank, comm| {
            // A different arrival order every run.
            let delay = (rank as u64 * 7 + run * 3) % 5;
            std::thread::sleep(Duration::from_millis(delay));
            let mut buf = data[rank].clone();
            comm.all_reduce(&mut buf, ReduceOp::Sum)
                .expect("all_reduce");
            let mut shard = vec![0.0; shard_range(len, world, rank).len()];
            comm.reduce_scatter_uneven(&data[rank], &mut shard, ReduceOp::Avg)
                .expect("reduce_scatter");
            (bits(&buf), bits(&shard))
        });
        runs.push(out);
    }
    for run in &runs[1..] {
        assert_eq!(run, &runs[0]);
    }
    assert_eq!(runs[0][0].0, bits(&reference(&data, 0..len, ReduceOp::Sum)));
}

#[test]
fn many_consecutive_collectives_do_not_deadlock() {
    let out = run_group(4, T, |rank, comm| {
        let mut total = 0.0f32;
        for step in 0..300 {
            let mut v = [rank as f32 + step as f32];
            comm.all_reduce(&mut v, ReduceOp::Sum)?;
            total += v[0];
            if step % 3 == 0 {
                comm.barrier()?;
            }
        }
        Ok::<_, CommError>(total)
    });
    // Sum over steps of (0+1+2+3 + 4*step).
    let want: f32 = (0..300).map(|s| 6.0 + 4.0 * s as f32).sum();
    for got in out {
        assert_eq!(got.expect("collectives"), want);
    }
}

#[test]
fn missing_rank_times_out_instead_of_hanging() {
    let mut comms = LocalGroup::with_timeout(3, Duration::from_millis(300));
    let absent = comms.pop().expect("three endpoints");
    let started = Instant::now();
    let errors: Vec<CommError> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                s.spawn(move || {
                    let mut buf = vec![1.0f32; 64];
                    comm.all_reduce(&mut buf, ReduceOp::Sum)
                        .expect_err("rank 2 never arrives")
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    let mut timeouts = 0;
    for e in &errors {
        match e {
            CommError::Timeout { missing, rank, .. } => {
                // Rank 2 never comes; under heavy load the other waiter may also be late.
                assert!(missing.contains(&2) && !missing.contains(rank), "{e}");
                timeouts += 1;
            }
            CommError::GroupBroken { reason, .. } => assert!(reason.contains("timed out"), "{e}"),
            other => panic!("unexpected error {other}"),
        }
    }
    assert!(timeouts >= 1, "{errors:?}");
    // The late rank finds the group broken at once.
    let late = absent.barrier().expect_err("group is broken");
    assert!(matches!(late, CommError::GroupBroken { .. }), "{late}");
}

#[test]
fn dropped_or_panicking_peer_fails_the_others_quickly() {
    for panic in [false, true] {
        let mut comms = LocalGroup::with_timeout(3, Duration::from_secs(30));
        let leaver = comms.pop().expect("three endpoints");
        let started = Instant::now();
        let errors: Vec<CommError> = std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .into_iter()
                .map(|comm| {
                    s.spawn(move || {
                        let mut buf = vec![1.0f32; 8];
                        comm.all_reduce(&mut buf, ReduceOp::Sum)
                            .expect_err("peer left")
                    })
                })
                .collect();
            let gone = s.spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                if panic {
                    let _keep = leaver;
                    panic!("rank 2 fails on purpose");
                }
                drop(leaver);
            });
            assert_eq!(gone.join().is_err(), panic);
            handles
                .into_iter()
                .map(|h| h.join().expect("thread"))
                .collect()
        });
        assert!(started.elapsed() < Duration::from_secs(10));
        let word = if panic { "panicked" } else { "dropped" };
        for e in errors {
            match &e {
                CommError::GroupBroken { reason, .. } => assert!(reason.contains(word), "{e}"),
                other => panic!("unexpected error {other}"),
            }
        }
    }
}

#[test]
fn mismatched_and_invalid_calls_are_reported_on_every_rank() {
    // Different lengths.
    let out = run_group(2, T, |rank, comm| {
        let mut buf = vec![0.0f32; 10 + rank];
        comm.all_reduce(&mut buf, ReduceOp::Sum)
    });
    for r in out {
        let e = r.expect_err("mismatch");
        assert!(
            matches!(
                e,
                CommError::Mismatch { .. } | CommError::GroupBroken { .. }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("len 11"), "{e}");
    }
    // An even reduce-scatter on a length the world size does not divide.
    let out = run_group(3, T, |rank, comm| {
        let input = vec![1.0f32; 10];
        let mut output = vec![0.0f32; shard_range(10, 3, rank).len()];
        if rank == 1 {
            comm.reduce_scatter(&input, &mut output, ReduceOp::Sum)
        } else {
            comm.reduce_scatter_uneven(&input, &mut output, ReduceOp::Sum)
        }
    });
    for (rank, r) in out.into_iter().enumerate() {
        let e = r.expect_err("invalid call");
        if rank == 1 {
            assert!(matches!(e, CommError::InvalidArgument { .. }), "{e}");
            assert!(e.to_string().contains("reduce_scatter_uneven"), "{e}");
        } else {
            assert!(matches!(e, CommError::GroupBroken { .. }), "{e}");
        }
    }
}
