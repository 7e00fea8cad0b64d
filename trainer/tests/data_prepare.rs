//! `prepare` and the shard format: round trips, determinism, and clear errors that leave
//! nothing half-written.

use std::fs;
use std::path::{Path, PathBuf};

use lathe_trainer::data::shard::{HEADER_BYTES, Shard, header_bytes, write_shard};
use lathe_trainer::data::{
    DataError, DatasetMeta, Loader, LoaderConfig, PrepareOptions, Source, Split, TokenizerKind,
    prepare,
};

const DOC_A: &str = "First document.\nIt has two lines, and numbers: 12345.\n";
const DOC_B: &str = "Second document: ünïcödé, tabs\tand  spaces.\n\nThe end.";
const DOC_C: &str = "Third and last: a short one.";

fn write_inputs(dir: &Path) -> Vec<PathBuf> {
    let docs = [DOC_A, DOC_B, DOC_C];
    docs.iter()
        .enumerate()
        .map(|(i, d)| {
            let p = dir.join(format!("doc{i}.txt"));
            fs::write(&p, d).unwrap();
            p
        })
        .collect()
}

fn opts(inputs: Vec<PathBuf>, out: &Path, tok: TokenizerKind) -> PrepareOptions {
    let mut o = PrepareOptions::new(inputs, out);
    o.tokenizer = tok;
    o.val_fraction = 0.25;
    o.shard_tokens = 16; // several shards even for tiny inputs
    o
}

/// The concatenated tokens of every shard of `split` in `dir`.
fn split_tokens(dir: &Path, meta: &DatasetMeta, split: Split) -> Vec<u32> {
    let mut all = Vec::new();
    for name in &meta.split(split).shards {
        let s = Shard::open(&dir.join(name)).unwrap();
        all.extend(s.to_vec().into_iter().map(u32::from));
    }
    all
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
}

#[test]
fn prepare_round_trips_for_both_tokenizers() {
    for tok in [TokenizerKind::Bytes, TokenizerKind::Gpt2] {
        let tmp = tempfile::tempdir().unwrap();
        let inputs = write_inputs(tmp.path());
        let out = tmp.path().join("out");
        let report = prepare(opts(inputs, &out, tok)).unwrap();
        let meta = DatasetMeta::read(&out).unwrap().unwrap();
        assert_eq!(meta, report.meta);
        assert_eq!(meta.tokenizer, tok);
        assert_eq!(meta.vocab_size, tok.vocab_size());
        assert_eq!(meta.documents, 3);

        // Expected streams: each document's encoding, split at round(0.25 * n) from the end,
        // each part preceded by the separator.
        let sep = tok.separator();
        let (mut train, mut val) = (Vec::new(), Vec::new());
        for d in [DOC_A, DOC_B, DOC_C] {
            let toks = tok.encode(d).unwrap();
            let v = (toks.len() as f64 * 0.25).round() as usize;
            let cut = toks.len() - v;
            train.push(sep);
            train.extend_from_slice(&toks[..cut]);
            val.push(sep);
            val.extend_from_slice(&toks[cut..]);
        }
        assert_eq!(split_tokens(&out, &meta, Split::Train), train, "{tok}");
        assert_eq!(split_tokens(&out, &meta, Split::Val), val, "{tok}");
        assert_eq!(meta.train.tokens, train.len() as u64);
        assert_eq!(meta.val.tokens, val.len() as u64);
        // Full shards hold exactly shard_tokens; the names are sequential.
        let n = meta.train.shards.len();
        assert_eq!(n, train.len().div_ceil(16));
        assert_eq!(meta.train.shards[0], "train_000000.bin");
        assert_eq!(meta.train.shards[n - 1], format!("train_{:06}.bin", n - 1));
        assert_eq!(report.train_shards.len(), n);

        // Loading (unshuffled, T = 7) gives consecutive windows of the first shard.
        let mut cfg = LoaderConfig::new(1, 7);
        cfg.shuffle = false;
        cfg.workers = 0;
        let mut loader = Loader::open(&Source::shards(&out), Split::Train, cfg, None).unwrap();
        let b0 = loader.next_batch().unwrap();
        let b1 = loader.next_batch().unwrap();
        assert_eq!(b0.inputs, train[0..7]);
        assert_eq!(b0.targets, train[1..8]);
        assert_eq!(b1.inputs, train[7..14]);
        assert_eq!(b1.targets, train[8..15]);
        // Decoding the train and val parts of the first document gives its text back.
        let first_train: Vec<u32> = train[1..]
            .iter()
            .take_while(|&&t| t != sep)
            .copied()
            .collect();
        let first_val: Vec<u32> = val[1..]
            .iter()
            .take_while(|&&t| t != sep)
            .copied()
            .collect();
        let mut text = tok.decode(&first_train).unwrap();
        text.extend(tok.decode(&first_val).unwrap());
        assert_eq!(text, DOC_A.as_bytes());
    }
}

#[test]
fn identical_input_gives_byte_identical_output() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = write_inputs(tmp.path());
    for tok in [TokenizerKind::Bytes, TokenizerKind::Gpt2] {
        let (o1, o2) = (
            tmp.path().join(format!("a-{tok}")),
            tmp.path().join(format!("b-{tok}")),
        );
        prepare(opts(inputs.clone(), &o1, tok)).unwrap();
        prepare(opts(inputs.clone(), &o2, tok)).unwrap();
        let names = listing(&o1);
        assert_eq!(names, listing(&o2));
        assert!(names.contains(&"meta.json".to_string()));
        assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
        for n in &names {
            assert_eq!(
                fs::read(o1.join(n)).unwrap(),
                fs::read(o2.join(n)).unwrap(),
                "{n}"
            );
        }
    }
}

#[test]
fn bad_inputs_give_clear_errors_and_leave_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");

    // Missing input file: named, and the output directory is never created.
    let missing = tmp.path().join("nope.txt");
    let err = prepare(opts(vec![missing], &out, TokenizerKind::Bytes)).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DataError::BadInput { .. }), "{msg}");
    assert!(
        msg.contains("nope.txt") && msg.contains("does not exist"),
        "{msg}"
    );
    assert!(!out.exists());

    // Empty input.
    let empty = tmp.path().join("empty.txt");
    fs::write(&empty, "").unwrap();
    let err = prepare(opts(vec![empty.clone()], &out, TokenizerKind::Gpt2)).unwrap_err();
    assert!(matches!(err, DataError::EmptyInput(_)), "{err}");
    assert!(err.to_string().contains("empty"), "{err}");
    assert!(!out.exists());
    let err = prepare(opts(vec![], &out, TokenizerKind::Gpt2)).unwrap_err();
    assert!(matches!(err, DataError::EmptyInput(_)), "{err}");

    // A failure after shards were already written (second document is not UTF-8): the error
    // names the file and offset, and every file of the run is removed, directory included.
    let good = tmp.path().join("good.txt");
    fs::write(&good, DOC_A.repeat(20)).unwrap();
    let bad = tmp.path().join("latin1.txt");
    fs::write(&bad, b"caf\xe9 au lait").unwrap();
    let err = prepare(opts(vec![good.clone(), bad], &out, TokenizerKind::Gpt2)).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("latin1.txt") && msg.contains("byte offset 3"),
        "{msg}"
    );
    assert!(!out.exists(), "left behind: {:?}", listing(&out));

    // Same failure into an existing directory with an unrelated file: only that file remains.
    fs::create_dir(&out).unwrap();
    fs::write(out.join("notes.txt"), "keep me").unwrap();
    let bad = tmp.path().join("latin1.txt");
    prepare(opts(vec![good.clone(), bad], &out, TokenizerKind::Gpt2)).unwrap_err();
    assert_eq!(listing(&out), vec!["notes.txt".to_string()]);

    // An output directory that already holds a dataset is refused, and left untouched.
    prepare(opts(vec![good.clone()], &out, TokenizerKind::Bytes)).unwrap();
    let before = listing(&out);
    let err = prepare(opts(vec![good.clone()], &out, TokenizerKind::Bytes)).unwrap_err();
    assert!(
        err.to_string().contains("already holds a prepared dataset"),
        "{err}"
    );
    assert_eq!(listing(&out), before);

    // An output path that is a file.
    let err = prepare(opts(vec![good], &empty, TokenizerKind::Bytes)).unwrap_err();
    assert!(err.to_string().contains("not a directory"), "{err}");
}

#[test]
fn corrupt_shards_give_errors_naming_file_and_offset() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let good = dir.join("train_000000.bin");
    write_shard(&good, &[1, 2, 3, 4, 5]).unwrap();
    let bytes = fs::read(&good).unwrap();
    assert_eq!(bytes.len(), HEADER_BYTES + 10);
    assert_eq!(&bytes[..HEADER_BYTES], &header_bytes(5));

    let check = |name: &str, data: &[u8], want: &[&str]| {
        let p = dir.join(name);
        fs::write(&p, data).unwrap();
        let msg = Shard::open(&p).unwrap_err().to_string();
        assert!(msg.contains(name), "{msg}");
        for w in want {
            assert!(msg.contains(w), "`{msg}` lacks `{w}`");
        }
    };
    let mut bad_magic = bytes.clone();
    bad_magic[0] ^= 0xff;
    check("magic.bin", &bad_magic, &["bad magic", "byte offset 0"]);
    let mut bad_version = bytes.clone();
    bad_version[4] = 2;
    check("version.bin", &bad_version, &["version 2", "byte offset 4"]);
    check(
        "truncated.bin",
        &bytes[..bytes.len() - 3],
        &["truncated", "1031 bytes", "1034"],
    );
    check("short.bin", &bytes[..100], &["100 bytes", "header"]);
    let mut trailing = bytes.clone();
    trailing.extend_from_slice(&[0, 0]);
    check("trailing.bin", &trailing, &["trailing"]);

    // Out-of-vocabulary token: the full scan and the loader both name file, index and offset.
    let oov = dir.join("oov_train.bin");
    write_shard(&oov, &[1, 2, 3, 300, 5, 6, 7, 8, 9]).unwrap();
    let msg = Shard::open(&oov)
        .unwrap()
        .check_tokens(257)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("oov_train.bin") && msg.contains("token index 3"),
        "{msg}"
    );
    assert!(
        msg.contains("byte offset 1030") && msg.contains("300"),
        "{msg}"
    );
    let mut cfg = LoaderConfig::new(1, 4);
    cfg.shuffle = false;
    cfg.workers = 1;
    let src = Source::Shards {
        path: oov.clone(),
        vocab_size: Some(257),
    };
    let mut loader = Loader::open(&src, Split::Train, cfg, None).unwrap();
    let msg = loader.next_batch().unwrap_err().to_string();
    assert!(
        msg.contains("oov_train.bin") && msg.contains("token index 3"),
        "{msg}"
    );

    // Missing directory, and a directory without shards of the split.
    let src = Source::shards(dir.join("no-such-dir"));
    let msg = Loader::open(&src, Split::Train, LoaderConfig::new(1, 4), None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("no-such-dir") && msg.contains("does not exist"),
        "{msg}"
    );
    let msg = Loader::open(
        &Source::shards(dir),
        Split::Val,
        LoaderConfig::new(1, 4),
        None,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(msg.contains("no val shards"), "{msg}");
    // A corrupt shard among good ones fails the open, naming it.
    fs::write(dir.join("broken_train.bin"), &bad_magic).unwrap();
    let msg = Loader::open(
        &Source::shards(dir),
        Split::Train,
        LoaderConfig::new(1, 2),
        None,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        msg.contains("broken_train.bin") && msg.contains("bad magic"),
        "{msg}"
    );
}

#[test]
fn unfinished_shard_writer_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("train_000000.bin");
    {
        let mut w = lathe_trainer::data::ShardWriter::create(&path).unwrap();
        w.push(&[1, 2, 3]).unwrap();
        assert_eq!(
            listing(tmp.path()),
            vec![".train_000000.bin.tmp".to_string()]
        );
    }
    assert!(listing(tmp.path()).is_empty());
}
