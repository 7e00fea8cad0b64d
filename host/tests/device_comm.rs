//! `DeviceComm` on simulated devices: the host-staged path equals the host collectives bit for
//! bit, and NCCL on a simulated device is a clear error.

use half::bf16;
use lathe_host::comm::{
    CommError, Communicator, DeviceComm, LocalComm, LocalGroup, NcclId, ReduceOp, shard_ranges,
};
use lathe_host::{Device, DeviceBuffer, DeviceElem};

/// Non-zero pseudo-random values in [-2, 2), different per rank and seed.
fn data(rank: usize, seed: u64, n: usize) -> Vec<f32> {
    let mut x = seed
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(rank as u64 * 0x1234_5678_9abc);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = ((x >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0;
            if v == 0.0 { 0.5 } else { v }
        })
        .collect()
}

fn bits<T: DeviceElem>(v: &[T]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

/// Runs `f(rank, device comm, host comm)` on `world` threads: the device comm stages over one
/// in-process group, the host comm (the reference) is another group of the same ranks.
fn on_ranks<R: Send>(world: usize, f: impl Fn(usize, DeviceComm, LocalComm) -> R + Sync) -> Vec<R> {
    let dc = LocalGroup::new(world);
    let hc = LocalGroup::new(world);
    std::thread::scope(|s| {
        let hs: Vec<_> = dc
            .into_iter()
            .zip(hc)
            .enumerate()
            .map(|(r, (d, h))| {
                let f = &f;
                s.spawn(move || f(r, DeviceComm::staged(d), h))
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    })
}

#[test]
fn staged_collectives_on_sim_devices_equal_the_host_collectives_bitwise() {
    for world in [2usize, 3] {
        let n = 37; // not a multiple of 2 or 3: uneven shards
        let range = 5..29;
        on_ranks(world, |rank, dc, hc| {
            let dev = Device::sim().unwrap();
            assert_eq!((dc.rank(), dc.world_size()), (rank, world));
            assert!(!dc.is_nccl());
            let mine = data(rank, 1, n);

            // all_reduce (avg, f32) of a sub-range; the rest untouched.
            let mut buf = dev.htod(&mine).unwrap();
            dc.all_reduce(&mut buf, range.clone(), ReduceOp::Avg)
                .unwrap();
            let mut want = mine.clone();
            hc.all_reduce(&mut want[range.clone()], ReduceOp::Avg)
                .unwrap();
            assert_eq!(bits(&buf.to_vec().unwrap()), bits(&want), "all_reduce f32");

            // all_reduce (sum, bf16) of the whole buffer.
            let mine16: Vec<bf16> = mine.iter().map(|&x| bf16::from_f32(x)).collect();
            let mut buf16 = dev.htod(&mine16).unwrap();
            dc.all_reduce(&mut buf16, 0..n, ReduceOp::Sum).unwrap();
            let mut want16 = mine16.clone();
            hc.all_reduce(&mut want16[..], ReduceOp::Sum).unwrap();
            assert_eq!(
                bits(&buf16.to_vec().unwrap()),
                bits(&want16),
                "all_reduce bf16"
            );

            // reduce_to_shards: this rank keeps the averaged part of `range` in its shard.
            let shards = shard_ranges(n, world);
            let own = shards[rank].clone();
            let src = dev.htod(&mine).unwrap();
            let poison = vec![f32::NAN; own.len()];
            let mut keep: DeviceBuffer<f32> = dev.htod(&poison).unwrap();
            dc.reduce_to_shards(&src, range.clone(), ReduceOp::Avg, &shards, &mut keep)
                .unwrap();
            let mut avg = mine.clone();
            hc.all_reduce(&mut avg[range.clone()], ReduceOp::Avg)
                .unwrap();
            let got = keep.to_vec().unwrap();
            for (i, g) in own.clone().zip(&got) {
                if range.contains(&i) {
                    assert_eq!(g.to_bits(), avg[i].to_bits(), "reduce_to_shards at {i}");
                } else {
                    assert!(g.is_nan(), "reduce_to_shards wrote {i}, outside the range");
                }
            }
            assert_eq!(bits(&src.to_vec().unwrap()), bits(&mine), "source changed");

            // gather_range (bf16) from the owners' shards, and all_gather_uneven.
            let full16: Vec<bf16> = data(0, 7, n).iter().map(|&x| bf16::from_f32(x)).collect();
            let shard16 = dev.htod(&full16[own.clone()]).unwrap();
            let mut out = dev.alloc::<bf16>(range.len()).unwrap();
            dc.gather_range(range.clone(), &shards, &shard16, &mut out)
                .unwrap();
            assert_eq!(bits(&out.to_vec().unwrap()), bits(&full16[range.clone()]));
            let mut all = dev.alloc::<bf16>(n).unwrap();
            dc.all_gather_uneven(&shard16, &mut all).unwrap();
            let mut want_all = vec![bf16::ZERO; n];
            hc.all_gather_uneven(&full16[own.clone()], &mut want_all[..])
                .unwrap();
            assert_eq!(bits(&all.to_vec().unwrap()), bits(&want_all));
            assert_eq!(bits(&want_all), bits(&full16));

            // broadcast of a sub-range from the last rank; u32 max of a flag word.
            let mut b = dev.htod(&mine).unwrap();
            dc.broadcast(&mut b, 3..9, world - 1).unwrap();
            let mut want_b = mine.clone();
            hc.broadcast(&mut want_b[3..9], world - 1).unwrap();
            assert_eq!(bits(&b.to_vec().unwrap()), bits(&want_b), "broadcast");
            let mut flags = dev.htod(&[7u32, u32::from(rank == 1), 9]).unwrap();
            dc.all_reduce(&mut flags, 1..2, ReduceOp::Max).unwrap();
            assert_eq!(flags.to_vec().unwrap(), vec![7, 1, 9]);

            dc.barrier().unwrap();
            dc.poll().unwrap();
            dc.synchronize().unwrap();
        });
    }
}

#[test]
fn staged_ranges_are_checked() {
    on_ranks(1, |_, dc, _| {
        let dev = Device::sim().unwrap();
        let mut buf = dev.htod(&[1.0f32; 4]).unwrap();
        let e = dc
            .all_reduce(&mut buf, 2..9, ReduceOp::Sum)
            .expect_err("range past the end");
        assert!(matches!(e, CommError::InvalidArgument { .. }), "{e}");
    });
}

#[test]
fn nccl_on_a_simulated_device_is_a_clear_error() {
    let dev = Device::sim().unwrap();
    let fake = NcclId::from_bytes(&[7u8; NcclId::LEN]).unwrap();
    let e = DeviceComm::nccl(&dev, 0, 2, &fake).expect_err("no NCCL on a simulated device");
    assert!(matches!(e, CommError::Unavailable { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("NCCL") && msg.contains("simulated"), "{msg}");
}
