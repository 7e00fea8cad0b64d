//! `lathe prepare`: text files in, token shards out.
//!
//! Each input file is one document. Documents are tokenized in the order given and laid out as
//! llm.c does: every document is preceded by the separator token (`<|endoftext|>` = 50256 for
//! gpt2, 256 for bytes), so the stream starts with a separator and one sits between any two
//! documents. Empty files are skipped.
//!
//! **Validation split.** With `--val-fraction F`, the *last* `round(F * n)` tokens of each
//! document (of `n` tokens) go to the validation stream and the rest to the training stream;
//! each part keeps its own leading separator. Splitting every document (rather than the tail of
//! the whole stream) keeps the validation set drawn from every input file, so a run on several
//! sources is validated on all of them. The split is at a token boundary of the whole document's
//! encoding, so concatenating a document's train and val parts gives exactly the tokenizer's
//! output. The default F is 0.1.
//!
//! **Output.** `train_000000.bin, train_000001.bin, ...` and `val_000000.bin, ...`, each holding
//! `--shard-tokens` tokens (default 100M, as llm.c) except the last of each split, plus
//! `meta.json` (tokenizer, vocabulary, counts). Every file is written under a temporary name,
//! fsynced and renamed; `meta.json` is written last. Identical inputs and options give
//! byte-identical output. The dataset is built in a hidden sibling directory and put in place
//! whole at the end; if anything fails, or SIGINT/SIGTERM arrives (`lathe prepare` catches
//! both), the build directory is removed, so `--out` never holds half a dataset. A `kill -9`
//! leaves only the hidden directory, which the next `prepare` next to it removes.

use std::fs::{self, File};
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use super::Split;
use super::error::{DataError, Result};
use super::shard::{MAX_SHARD_TOKENS, ShardWriter, is_split_shard_name, sync_parent, temp_name};
use super::tokenizer::TokenizerKind;

/// llm.c's shard size: 100M tokens.
pub const DEFAULT_SHARD_TOKENS: u64 = 100_000_000;
/// Default share of each document that goes to validation.
pub const DEFAULT_VAL_FRACTION: f64 = 0.1;
/// Value of `meta.json`'s `format` field.
pub const META_FORMAT: &str = "lathe-shards-v1";

/// Options of [`prepare`].
#[derive(Clone, Debug)]
pub struct PrepareOptions {
    /// Input files; each one is a document.
    pub inputs: Vec<PathBuf>,
    /// Output directory (created if missing; must not already hold a dataset).
    pub out: PathBuf,
    pub tokenizer: TokenizerKind,
    /// Share of each document (its tail) put in the validation split, in `[0, 1)`.
    pub val_fraction: f64,
    /// Tokens per shard, `1..=i32::MAX`.
    pub shard_tokens: u64,
    /// Show a progress bar (on stderr, and only when it is a terminal).
    pub progress: bool,
}

impl PrepareOptions {
    /// Defaults: gpt2, val fraction 0.1, 100M tokens per shard, no progress bar.
    pub fn new(inputs: Vec<PathBuf>, out: impl Into<PathBuf>) -> Self {
        PrepareOptions {
            inputs,
            out: out.into(),
            tokenizer: TokenizerKind::default(),
            val_fraction: DEFAULT_VAL_FRACTION,
            shard_tokens: DEFAULT_SHARD_TOKENS,
            progress: false,
        }
    }
}

/// Token count and shard file names of one split, as recorded in `meta.json`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SplitMeta {
    pub tokens: u64,
    /// File names (relative to the dataset directory), in order.
    pub shards: Vec<String>,
}

/// The `meta.json` written next to the shards.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DatasetMeta {
    /// Always [`META_FORMAT`].
    pub format: String,
    pub tokenizer: TokenizerKind,
    /// Every token is below this.
    pub vocab_size: u32,
    /// Token that precedes each document.
    pub separator: u32,
    /// Non-empty input documents.
    pub documents: u64,
    pub val_fraction: f64,
    pub shard_tokens: u64,
    pub train: SplitMeta,
    pub val: SplitMeta,
}

impl DatasetMeta {
    /// File name of the metadata inside a dataset directory.
    pub const FILE: &'static str = "meta.json";

    /// Reads `dir/meta.json`; `Ok(None)` when there is none (e.g. shards written by llm.c).
    pub fn read(dir: &Path) -> Result<Option<DatasetMeta>> {
        let path = dir.join(Self::FILE);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(DataError::io("cannot read", &path, e)),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| DataError::BadMeta {
                path,
                reason: e.to_string(),
            })
    }

    /// The split's record.
    pub fn split(&self, split: Split) -> &SplitMeta {
        match split {
            Split::Train => &self.train,
            Split::Val => &self.val,
        }
    }
}

/// What [`prepare`] wrote.
#[derive(Clone, Debug)]
pub struct PrepareReport {
    /// Contents of the `meta.json` written.
    pub meta: DatasetMeta,
    pub train_shards: Vec<PathBuf>,
    pub val_shards: Vec<PathBuf>,
    /// Total size of the inputs.
    pub input_bytes: u64,
}

/// Tokenizes `opts.inputs` into shards under `opts.out`. See the module documentation for the
/// layout, the validation split and the failure guarantees.
pub fn prepare(opts: PrepareOptions) -> Result<PrepareReport> {
    if opts.inputs.is_empty() {
        return Err(DataError::EmptyInput("no input files were given".into()));
    }
    if !(0.0..1.0).contains(&opts.val_fraction) {
        return Err(DataError::Config(format!(
            "val fraction must be in [0, 1), got {}",
            opts.val_fraction
        )));
    }
    if opts.shard_tokens == 0 || opts.shard_tokens > MAX_SHARD_TOKENS {
        return Err(DataError::Config(format!(
            "shard tokens must be in 1..={MAX_SHARD_TOKENS}, got {}",
            opts.shard_tokens
        )));
    }
    // Check every input before touching the output directory.
    let mut sizes = Vec::with_capacity(opts.inputs.len());
    for path in &opts.inputs {
        sizes.push(input_size(path)?);
    }
    let input_bytes: u64 = sizes.iter().sum();
    if input_bytes == 0 {
        return Err(DataError::EmptyInput(format!(
            "all {} input file(s) are empty",
            opts.inputs.len()
        )));
    }

    let mut staging = Staging::open(&opts.out, opts.shard_tokens)?;
    let bar = progress_bar(opts.progress, input_bytes);
    let mut documents = 0u64;
    for (path, &size) in opts.inputs.iter().zip(&sizes) {
        check_interrupted()?;
        if size == 0 {
            continue;
        }
        documents += 1;
        match opts.tokenizer {
            TokenizerKind::Bytes => {
                add_bytes_document(&mut staging, path, size, opts.val_fraction, &bar)?
            }
            TokenizerKind::Gpt2 => {
                let data =
                    fs::read(path).map_err(|e| DataError::io("cannot read input", path, e))?;
                let text = std::str::from_utf8(&data).map_err(|e| DataError::NotUtf8 {
                    path: path.clone(),
                    offset: e.valid_up_to() as u64,
                })?;
                let tokens = opts.tokenizer.encode(text)?;
                let v = val_count(tokens.len() as u64, opts.val_fraction) as usize;
                let (train, val) = tokens.split_at(tokens.len() - v);
                let sep = opts.tokenizer.separator();
                staging.train.push_document(sep, train, path)?;
                staging.val.push_document(sep, val, path)?;
                bar.inc(size);
            }
        }
    }
    bar.finish_and_clear();
    check_interrupted()?;
    if staging.train.total == 0 {
        return Err(DataError::EmptyInput(format!(
            "the inputs hold no training tokens after taking the validation fraction {}",
            opts.val_fraction
        )));
    }
    staging.finish(opts.tokenizer, documents, opts.val_fraction, input_bytes)
}

/// Number of a document's `n` tokens that go to validation: `round(fraction * n)`.
pub fn val_count(n: u64, fraction: f64) -> u64 {
    ((n as f64 * fraction).round() as u64).min(n)
}

fn input_size(path: &Path) -> Result<u64> {
    match fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(m.len()),
        Ok(_) => Err(DataError::BadInput {
            path: path.to_path_buf(),
            reason: "is not a regular file",
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(DataError::BadInput {
            path: path.to_path_buf(),
            reason: "does not exist",
        }),
        Err(e) => Err(DataError::io("cannot read input file", path, e)),
    }
}

/// Streams a file as byte tokens: the first `size - v` bytes to train, the rest to val.
fn add_bytes_document(
    staging: &mut Staging,
    path: &Path,
    size: u64,
    fraction: f64,
    bar: &ProgressBar,
) -> Result<()> {
    let mut file = File::open(path).map_err(|e| DataError::io("cannot open input", path, e))?;
    let train_len = size - val_count(size, fraction);
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    let sep = TokenizerKind::Bytes.separator();
    if train_len > 0 {
        staging.train.push_tokens(&[sep], path)?;
    }
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| DataError::io("cannot read input", path, e))?;
        if n == 0 {
            break;
        }
        check_interrupted()?;
        if pos + n as u64 > size {
            return Err(changed(path));
        }
        let chunk = &buf[..n];
        let to_train = (train_len.saturating_sub(pos) as usize).min(n);
        staging.train.push_bytes(&chunk[..to_train], path)?;
        if to_train < n {
            // The val part's separator goes before its first byte.
            if pos + (to_train as u64) == train_len {
                staging.val.push_tokens(&[sep], path)?;
            }
            staging.val.push_bytes(&chunk[to_train..], path)?;
        }
        pos += n as u64;
        bar.inc(n as u64);
    }
    if pos != size {
        return Err(changed(path));
    }
    Ok(())
}

fn changed(path: &Path) -> DataError {
    DataError::io(
        "input changed size while being read",
        path,
        std::io::Error::other("file size differs from its metadata"),
    )
}

fn progress_bar(enabled: bool, total: u64) -> ProgressBar {
    if !enabled || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(
        "prepare {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style);
    }
    bar
}

/// One split's shard sequence: rolls over to a new shard every `shard_tokens` tokens.
struct SplitWriter {
    dir: PathBuf,
    split: Split,
    shard_tokens: u64,
    current: Option<ShardWriter>,
    finished: Vec<PathBuf>,
    total: u64,
    scratch: Vec<u16>,
}

impl SplitWriter {
    fn new(dir: &Path, split: Split, shard_tokens: u64) -> Self {
        SplitWriter {
            dir: dir.to_path_buf(),
            split,
            shard_tokens,
            current: None,
            finished: Vec::new(),
            total: 0,
            scratch: Vec::new(),
        }
    }

    /// `sep` then `tokens`, unless `tokens` is empty.
    fn push_document(&mut self, sep: u32, tokens: &[u32], input: &Path) -> Result<()> {
        if tokens.is_empty() {
            return Ok(());
        }
        self.push_tokens(&[sep], input)?;
        self.push_tokens(tokens, input)
    }

    fn push_tokens(&mut self, tokens: &[u32], input: &Path) -> Result<()> {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        for &t in tokens {
            let Ok(t16) = u16::try_from(t) else {
                return Err(DataError::Tokenizer(format!(
                    "{}: token {t} does not fit a u16 shard",
                    input.display()
                )));
            };
            scratch.push(t16);
        }
        let r = self.push_u16(&scratch);
        self.scratch = scratch;
        r
    }

    fn push_bytes(&mut self, bytes: &[u8], _input: &Path) -> Result<()> {
        let mut rest = bytes;
        while !rest.is_empty() {
            let room = self.room()?;
            let (now, later) = rest.split_at(room.min(rest.len()));
            self.writer()?.push_bytes(now)?;
            self.total += now.len() as u64;
            rest = later;
        }
        Ok(())
    }

    fn push_u16(&mut self, tokens: &[u16]) -> Result<()> {
        let mut rest = tokens;
        while !rest.is_empty() {
            let room = self.room()?;
            let (now, later) = rest.split_at(room.min(rest.len()));
            self.writer()?.push(now)?;
            self.total += now.len() as u64;
            rest = later;
        }
        Ok(())
    }

    /// Space left in the current shard, finishing it first when it is full.
    fn room(&mut self) -> Result<usize> {
        if let Some(w) = &self.current
            && w.count() >= self.shard_tokens
        {
            self.finish_current()?;
        }
        let used = self.current.as_ref().map_or(0, |w| w.count());
        Ok((self.shard_tokens - used).min(usize::MAX as u64) as usize)
    }

    fn writer(&mut self) -> Result<&mut ShardWriter> {
        if self.current.is_none() {
            let name = format!("{}_{:06}.bin", self.split.name(), self.finished.len());
            self.current = Some(ShardWriter::create(&self.dir.join(name))?);
        }
        match self.current.as_mut() {
            Some(w) => Ok(w),
            None => Err(DataError::Config("shard writer missing".into())),
        }
    }

    fn finish_current(&mut self) -> Result<()> {
        if let Some(w) = self.current.take() {
            let path = w.finish()?;
            self.finished.push(path);
        }
        Ok(())
    }

    fn meta(&self) -> SplitMeta {
        SplitMeta {
            tokens: self.total,
            shards: self
                .finished
                .iter()
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect(),
        }
    }
}

/// A dataset being written: everything goes into a hidden sibling of the output directory,
/// `.NAME.partial-PID`, which becomes the output directory whole at the end (renamed into place
/// when `--out` is missing or empty; otherwise its files are renamed in, `meta.json` last).
/// Dropped before `finish` succeeds, it removes the build directory, so an error, Ctrl-C or
/// SIGTERM never leaves a half dataset under the final names; a build directory left by a
/// killed process is removed by the next `prepare` next to it.
struct Staging {
    out: PathBuf,
    build: PathBuf,
    train: SplitWriter,
    val: SplitWriter,
    committed: bool,
}

/// The pid in a `.NAME.partial-PID` build directory's name, for output `NAME`.
fn partial_pid(entry: &str, out_name: &str) -> Option<u32> {
    entry
        .strip_prefix(&format!(".{out_name}.partial-"))?
        .parse()
        .ok()
}

impl Staging {
    fn open(dir: &Path, shard_tokens: u64) -> Result<Staging> {
        let out_err = |reason: String| DataError::OutDir {
            path: dir.to_path_buf(),
            reason,
        };
        match fs::metadata(dir) {
            Ok(m) if !m.is_dir() => return Err(out_err("exists and is not a directory".into())),
            Ok(_) => {
                let entries =
                    fs::read_dir(dir).map_err(|e| out_err(format!("cannot list: {e}")))?;
                for entry in entries {
                    let entry = entry.map_err(|e| out_err(format!("cannot list: {e}")))?;
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if name == DatasetMeta::FILE
                        || is_split_shard_name(&name, Split::Train)
                        || is_split_shard_name(&name, Split::Val)
                    {
                        return Err(out_err(format!(
                            "already holds a prepared dataset ({name}); remove it or choose another directory"
                        )));
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(out_err(e.to_string())),
        }
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| out_err("has no directory name".into()))?;
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&parent)
            .map_err(|e| out_err(format!("cannot create {}: {e}", parent.display())))?;
        // Build directories of killed runs.
        if let Ok(entries) = fs::read_dir(&parent) {
            for entry in entries.flatten() {
                let n = entry.file_name().to_string_lossy().into_owned();
                if partial_pid(&n, &name).is_some_and(|pid| {
                    pid != std::process::id() && !crate::signals::process_alive(pid)
                }) {
                    let _ = fs::remove_dir_all(entry.path());
                }
            }
        }
        let build = parent.join(format!(".{name}.partial-{}", std::process::id()));
        if build.exists() {
            fs::remove_dir_all(&build).map_err(|e| DataError::io("cannot remove", &build, e))?;
        }
        fs::create_dir(&build).map_err(|e| DataError::io("cannot create", &build, e))?;
        Ok(Staging {
            out: dir.to_path_buf(),
            train: SplitWriter::new(&build, Split::Train, shard_tokens),
            val: SplitWriter::new(&build, Split::Val, shard_tokens),
            build,
            committed: false,
        })
    }

    fn finish(
        mut self,
        tokenizer: TokenizerKind,
        documents: u64,
        val_fraction: f64,
        input_bytes: u64,
    ) -> Result<PrepareReport> {
        self.train.finish_current()?;
        self.val.finish_current()?;
        let meta = DatasetMeta {
            format: META_FORMAT.into(),
            tokenizer,
            vocab_size: tokenizer.vocab_size(),
            separator: tokenizer.separator(),
            documents,
            val_fraction,
            shard_tokens: self.train.shard_tokens,
            train: self.train.meta(),
            val: self.val.meta(),
        };
        let path = self.build.join(DatasetMeta::FILE);
        let mut text = serde_json::to_string_pretty(&meta)
            .map_err(|e| DataError::Config(format!("cannot serialize meta.json: {e}")))?;
        text.push('\n');
        write_atomic(&path, text.as_bytes())?;
        sync_parent(&path);
        self.commit()?;
        self.committed = true;
        let moved = |v: &[PathBuf]| -> Vec<PathBuf> {
            v.iter()
                .filter_map(|p| p.file_name().map(|n| self.out.join(n)))
                .collect()
        };
        Ok(PrepareReport {
            meta,
            train_shards: moved(&self.train.finished),
            val_shards: moved(&self.val.finished),
            input_bytes,
        })
    }

    /// Puts the finished build directory in place of `out`.
    fn commit(&self) -> Result<()> {
        let empty = match fs::read_dir(&self.out) {
            Ok(mut entries) => entries.next().is_none(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(e) => return Err(DataError::io("cannot list", &self.out, e)),
        };
        // rename(2) replaces a missing or empty directory in one step.
        if empty && fs::rename(&self.build, &self.out).is_ok() {
            sync_parent(&self.out);
            return Ok(());
        }
        // `out` holds other files: move the shards in, then meta.json, which marks the
        // dataset complete.
        let mut names: Vec<PathBuf> = self
            .train
            .finished
            .iter()
            .chain(&self.val.finished)
            .cloned()
            .collect();
        names.push(self.build.join(DatasetMeta::FILE));
        for from in names {
            let Some(n) = from.file_name() else { continue };
            let to = self.out.join(n);
            fs::rename(&from, &to).map_err(|e| DataError::io("cannot move into place", &to, e))?;
        }
        sync_parent(&self.out.join(DatasetMeta::FILE));
        let _ = fs::remove_dir_all(&self.build);
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        // Unfinished shard writers delete their temporary files when dropped.
        drop(self.train.current.take());
        drop(self.val.current.take());
        let _ = fs::remove_dir_all(&self.build);
    }
}

/// Stops `prepare` when SIGINT or SIGTERM arrived (see [`crate::signals`]).
fn check_interrupted() -> Result<()> {
    match crate::signals::received() {
        Some(sig) => Err(DataError::Interrupted(crate::signals::name(sig))),
        None => Ok(()),
    }
}

/// Checks that `dir` holds a complete dataset: with a `meta.json`, every shard it lists exists
/// with the recorded token counts; in any case no unfinished shard (`.NAME.bin.tmp`, left by an
/// interrupted writer) lies next to the shards. A directory of llm.c shards without `meta.json`
/// passes.
pub fn check_complete(dir: &Path) -> Result<()> {
    let incomplete = |reason: String| DataError::Incomplete {
        path: dir.to_path_buf(),
        reason,
    };
    let entries =
        fs::read_dir(dir).map_err(|e| DataError::io("cannot list data directory", dir, e))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(inner) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".tmp"))
            && (is_split_shard_name(inner, Split::Train) || is_split_shard_name(inner, Split::Val))
        {
            return Err(incomplete(format!("{name} is an unfinished shard")));
        }
    }
    let Some(meta) = DatasetMeta::read(dir)? else {
        return Ok(());
    };
    for split in [Split::Train, Split::Val] {
        let m = meta.split(split);
        let mut tokens = 0u64;
        for name in &m.shards {
            let p = dir.join(name);
            if !p.is_file() {
                return Err(incomplete(format!(
                    "{name}, listed in meta.json, is missing"
                )));
            }
            tokens += super::shard::Shard::open(&p)?.len() as u64;
        }
        if tokens != m.tokens {
            return Err(incomplete(format!(
                "the {} shards hold {tokens} tokens, meta.json records {}",
                split.name(),
                m.tokens
            )));
        }
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically: temporary name in the same directory, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_name(path);
    let result = (|| {
        let mut f = File::create(&tmp).map_err(|e| DataError::io("cannot create", &tmp, e))?;
        f.write_all(bytes)
            .map_err(|e| DataError::io("cannot write", &tmp, e))?;
        f.sync_all()
            .map_err(|e| DataError::io("cannot fsync", &tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| DataError::io("cannot rename into place", path, e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    } else {
        sync_parent(path);
    }
    result
}

/// Command-line arguments of `lathe prepare`.
#[derive(clap::Args, Clone, Debug)]
pub struct PrepareArgs {
    /// Input text files; each file is one document.
    #[arg(long = "input", value_name = "FILE", num_args = 1.., required = true)]
    pub input: Vec<PathBuf>,
    /// Output directory (created if missing; must not already hold a dataset).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Tokenizer: `gpt2` (BPE, vocabulary 50257) or `bytes` (vocabulary 257).
    #[arg(long, value_enum, default_value_t = TokenizerKind::Gpt2)]
    pub tokenizer: TokenizerKind,
    /// Share of each document (its last tokens) held out for validation, in [0, 1).
    #[arg(long, value_name = "F", default_value_t = DEFAULT_VAL_FRACTION)]
    pub val_fraction: f64,
    /// Tokens per shard file.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_SHARD_TOKENS)]
    pub shard_tokens: u64,
}

/// Entry point of `lathe prepare`: runs [`prepare`] with a progress bar when stderr is a
/// terminal, then prints a summary.
pub fn run_prepare(args: PrepareArgs) -> anyhow::Result<()> {
    let opts = PrepareOptions {
        inputs: args.input,
        out: args.out,
        tokenizer: args.tokenizer,
        val_fraction: args.val_fraction,
        shard_tokens: args.shard_tokens,
        progress: true,
    };
    let out = opts.out.clone();
    // Ctrl-C or SIGTERM stops at the next chunk and removes what was written.
    crate::signals::install();
    let report = prepare(opts)?;
    let m = &report.meta;
    println!(
        "prepared {} document(s), {} input bytes, tokenizer {} (vocab {}) into {}",
        m.documents,
        report.input_bytes,
        m.tokenizer,
        m.vocab_size,
        out.display()
    );
    println!(
        "  train: {} tokens in {} shard(s)\n  val:   {} tokens in {} shard(s)",
        m.train.tokens,
        m.train.shards.len(),
        m.val.tokens,
        m.val.shards.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: PrepareArgs,
    }

    #[test]
    fn cli_arguments() {
        let cli = Cli::try_parse_from([
            "prepare",
            "--input",
            "a.txt",
            "b.txt",
            "--out",
            "o",
            "--tokenizer",
            "bytes",
            "--val-fraction",
            "0.2",
            "--shard-tokens",
            "5",
        ])
        .unwrap();
        let a = cli.args;
        assert_eq!(
            a.input,
            vec![PathBuf::from("a.txt"), PathBuf::from("b.txt")]
        );
        assert_eq!(a.out, PathBuf::from("o"));
        assert_eq!(a.tokenizer, TokenizerKind::Bytes);
        assert_eq!((a.val_fraction, a.shard_tokens), (0.2, 5));
        let d = Cli::try_parse_from(["prepare", "--input", "a.txt", "--out", "o"]).unwrap();
        assert_eq!(d.args.tokenizer, TokenizerKind::Gpt2);
        assert_eq!(d.args.val_fraction, DEFAULT_VAL_FRACTION);
        assert_eq!(d.args.shard_tokens, DEFAULT_SHARD_TOKENS);
        assert!(Cli::try_parse_from(["prepare", "--out", "o"]).is_err());
    }

    #[test]
    fn val_count_rounds_and_clamps() {
        assert_eq!(val_count(10, 0.25), 3); // 2.5 rounds away from zero
        assert_eq!(val_count(10, 0.0), 0);
        assert_eq!(val_count(1, 0.6), 1);
        assert_eq!(val_count(0, 0.5), 0);
    }
}
