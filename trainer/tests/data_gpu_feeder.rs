//! The GPU feeder: batches written by the loader into pinned buffers, uploaded on the copy
//! stream, arrive on the device equal to the plain loader's batches. Skips without a GPU.

use lathe_host::testing::test_device;
use lathe_trainer::data::pinned::{DeviceFeeder, PinnedPool};
use lathe_trainer::data::{AdditionConfig, Loader, LoaderConfig, Source, Split};
use std::sync::Arc;

#[test]
fn pinned_uploads_match_the_plain_loader() {
    let dev = test_device("pinned_uploads_match_the_plain_loader");
    let source = Source::Addition(AdditionConfig::default());
    let mut cfg = LoaderConfig::new(8, 38);
    cfg.seed = 5;
    let mut plain = Loader::open(&source, Split::Train, cfg.clone(), None).unwrap();
    let windows = source.open(Split::Train, cfg.seq_len).unwrap();
    let pool = Arc::new(PinnedPool::new(&dev));
    let mut pinned = Loader::with_pool(windows, cfg, None, pool).unwrap();
    let mut feeder = DeviceFeeder::new(&dev);
    for step in 0..12 {
        let want = plain.next_batch().unwrap();
        let got = pinned.next_batch().unwrap();
        let d = feeder.upload(&pinned, got).unwrap();
        assert_eq!(
            d.inputs.to_vec().unwrap(),
            want.inputs(),
            "inputs of batch {step}"
        );
        assert_eq!(
            d.targets.to_vec().unwrap(),
            want.targets(),
            "targets of batch {step}"
        );
    }
    dev.synchronize().unwrap();
    feeder.recycle_finished(&pinned);
    assert_eq!(
        feeder.in_flight(),
        0,
        "finished copies return their buffers"
    );
}
