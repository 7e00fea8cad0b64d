//! Token shards in llm.c's `.bin` format, read through mmap and written atomically.
//!
//! Layout (all little-endian):
//!
//! ```text
//! byte 0     i32 magic = 20240520
//! byte 4     i32 version = 1            (version 1: u16 tokens)
//! byte 8     i32 count                  number of tokens
//! byte 12    253 x i32, all zero        (header is 256 x i32 = 1024 bytes)
//! byte 1024  count x u16 tokens
//! ```
//!
//! A shard is valid when the header carries the magic and version, the count is non-negative,
//! and the file is exactly `1024 + 2 * count` bytes. Checking every token against a vocabulary
//! is a full scan ([`Shard::check_tokens`]); the loader instead checks each window as it reads it,
//! so opening a multi-GB shard set stays cheap.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::Split;
use super::error::{DataError, Result};

/// Header word 0.
pub const MAGIC: i32 = 20240520;
/// Header word 1: u16 tokens.
pub const VERSION: i32 = 1;
/// Number of i32 words in the header.
pub const HEADER_INTS: usize = 256;
/// Header size in bytes; tokens start here.
pub const HEADER_BYTES: usize = HEADER_INTS * 4;
/// Most tokens one shard can hold (the count is an i32).
pub const MAX_SHARD_TOKENS: u64 = i32::MAX as u64;

/// Tokens encoded per write call (bounds the writer's scratch buffer to 512 KiB).
const WRITE_CHUNK: usize = 1 << 18;

/// Byte offset of token `index` in a shard file.
pub fn token_offset(index: u64) -> u64 {
    HEADER_BYTES as u64 + 2 * index
}

/// A read-only, memory-mapped shard whose header and length have been validated.
#[derive(Debug)]
pub struct Shard {
    path: PathBuf,
    map: Mmap,
    len: usize,
}

impl Shard {
    /// Maps `path` and validates its header and length (not the token values).
    pub fn open(path: &Path) -> Result<Shard> {
        let file = File::open(path).map_err(|e| DataError::io("cannot open shard", path, e))?;
        let file_len = file
            .metadata()
            .map_err(|e| DataError::io("cannot stat shard", path, e))?
            .len();
        if file_len < HEADER_BYTES as u64 {
            return Err(DataError::HeaderTooShort {
                path: path.to_path_buf(),
                len: file_len,
            });
        }
        // SAFETY: the map is read-only and private to this process. Like every mmap-based reader
        // (llm.c's included), Lathe assumes a shard is not truncated or rewritten by another
        // process while it is being trained on; shards are only ever created by renaming a fully
        // written temporary file, never by writing in place.
        let map =
            unsafe { Mmap::map(&file) }.map_err(|e| DataError::io("cannot mmap shard", path, e))?;
        let word = |i: usize| {
            i32::from_le_bytes([map[4 * i], map[4 * i + 1], map[4 * i + 2], map[4 * i + 3]])
        };
        let path_buf = path.to_path_buf();
        if word(0) != MAGIC {
            return Err(DataError::BadMagic {
                path: path_buf,
                found: word(0),
            });
        }
        if word(1) != VERSION {
            return Err(DataError::BadVersion {
                path: path_buf,
                found: word(1),
            });
        }
        let count = word(2);
        if count < 0 {
            return Err(DataError::BadCount {
                path: path_buf,
                found: count,
            });
        }
        let expected = token_offset(count as u64);
        if expected != map.len() as u64 {
            return Err(DataError::LengthMismatch {
                path: path_buf,
                count: count as u64,
                expected,
                actual: map.len() as u64,
            });
        }
        Ok(Shard {
            path: path_buf,
            map,
            len: count as usize,
        })
    }

    /// The file this shard was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the shard holds no token.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The token area as raw little-endian bytes, `2 * len()` of them.
    pub fn token_bytes(&self) -> &[u8] {
        &self.map[HEADER_BYTES..]
    }

    /// Token `index`. Panics when `index >= len()`, like slice indexing.
    pub fn token(&self, index: usize) -> u16 {
        let b = &self.token_bytes()[2 * index..2 * index + 2];
        u16::from_le_bytes([b[0], b[1]])
    }

    /// Copies tokens `start .. start + out.len()` into `out`, widened to u32.
    /// Panics when the range is outside the shard, like slice indexing.
    pub fn read_u32(&self, start: usize, out: &mut [u32]) {
        let bytes = &self.token_bytes()[2 * start..2 * (start + out.len())];
        for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            *o = u16::from_le_bytes([b[0], b[1]]) as u32;
        }
    }

    /// All tokens as a vector (convenient for tests and small shards).
    pub fn to_vec(&self) -> Vec<u16> {
        self.token_bytes()
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect()
    }

    /// Full scan: every token must be below `vocab`. The error names the first offending token's
    /// index and byte offset.
    pub fn check_tokens(&self, vocab: u32) -> Result<()> {
        for (i, b) in self.token_bytes().chunks_exact(2).enumerate() {
            let tok = u16::from_le_bytes([b[0], b[1]]) as u32;
            if tok >= vocab {
                return Err(self.out_of_vocab(i as u64, tok, vocab));
            }
        }
        Ok(())
    }

    /// The error for token `index` (with value `token`) being outside a vocabulary of `vocab`.
    pub fn out_of_vocab(&self, index: u64, token: u32, vocab: u32) -> DataError {
        DataError::TokenOutOfVocab {
            path: self.path.clone(),
            index,
            offset: token_offset(index),
            token,
            vocab,
        }
    }
}

/// Writes one shard under a temporary name in the destination directory (`.NAME.tmp`), then
/// fills in the header, fsyncs, and renames it into place in [`ShardWriter::finish`]. Dropped
/// without `finish` (an error, a panic), it removes the temporary file: a shard name in the
/// directory always refers to a complete shard.
pub struct ShardWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: Option<BufWriter<File>>,
    count: u64,
    scratch: Vec<u8>,
}

impl ShardWriter {
    /// Starts writing the shard that will be named `path`.
    pub fn create(path: &Path) -> Result<ShardWriter> {
        let tmp = temp_name(path);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| DataError::io("cannot create shard", &tmp, e))?;
        let mut w = ShardWriter {
            path: path.to_path_buf(),
            tmp,
            out: Some(BufWriter::with_capacity(1 << 20, file)),
            count: 0,
            scratch: Vec::new(),
        };
        // Placeholder header, rewritten in `finish` once the count is known.
        w.write_raw(&[0u8; HEADER_BYTES])?;
        Ok(w)
    }

    /// The final name of the shard.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tokens written so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Appends tokens.
    pub fn push(&mut self, tokens: &[u16]) -> Result<()> {
        for chunk in tokens.chunks(WRITE_CHUNK) {
            self.push_with(chunk.len(), |buf| {
                for t in chunk {
                    buf.extend_from_slice(&t.to_le_bytes());
                }
            })?;
        }
        Ok(())
    }

    /// Appends byte-level tokens: each byte becomes one token (its value, 0..=255).
    pub fn push_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        for chunk in bytes.chunks(WRITE_CHUNK) {
            self.push_with(chunk.len(), |buf| {
                for &b in chunk {
                    buf.extend_from_slice(&[b, 0]);
                }
            })?;
        }
        Ok(())
    }

    /// Appends `n` tokens that `encode` writes as little-endian bytes into a scratch buffer.
    fn push_with(&mut self, n: usize, encode: impl FnOnce(&mut Vec<u8>)) -> Result<()> {
        if self.count + n as u64 > MAX_SHARD_TOKENS {
            return Err(DataError::ShardTooLarge {
                path: self.path.clone(),
                max: MAX_SHARD_TOKENS,
            });
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        scratch.reserve(2 * n);
        encode(&mut scratch);
        let r = self.write_raw(&scratch);
        self.scratch = scratch;
        r?;
        self.count += n as u64;
        Ok(())
    }

    fn write_raw(&mut self, bytes: &[u8]) -> Result<()> {
        let Some(out) = self.out.as_mut() else {
            return Err(DataError::Config("shard writer used after finish".into()));
        };
        out.write_all(bytes)
            .map_err(|e| DataError::io("cannot write shard", &self.tmp, e))
    }

    /// Writes the header, fsyncs, and renames the temporary file to its final name.
    pub fn finish(mut self) -> Result<PathBuf> {
        let Some(out) = self.out.take() else {
            return Err(DataError::Config("shard writer finished twice".into()));
        };
        let tmp = &self.tmp;
        let io = |what: &'static str| move |e| DataError::io(what, tmp, e);
        let mut file = out
            .into_inner()
            .map_err(|e| DataError::io("cannot write shard", &self.tmp, e.into_error()))?;
        file.seek(SeekFrom::Start(0))
            .map_err(io("cannot seek in shard"))?;
        file.write_all(&header_bytes(self.count))
            .map_err(io("cannot write shard header"))?;
        file.sync_all().map_err(io("cannot fsync shard"))?;
        drop(file);
        fs::rename(&self.tmp, &self.path)
            .map_err(|e| DataError::io("cannot rename shard into place", &self.path, e))?;
        sync_parent(&self.path);
        Ok(self.path.clone())
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        if self.out.take().is_some() {
            // Not finished: leave nothing half-written behind.
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// The 1024-byte header of a shard holding `count` tokens.
pub fn header_bytes(count: u64) -> [u8; HEADER_BYTES] {
    let mut h = [0u8; HEADER_BYTES];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&VERSION.to_le_bytes());
    h[8..12].copy_from_slice(&(count as i32).to_le_bytes());
    h
}

/// Writes a complete shard atomically (temporary name, fsync, rename).
pub fn write_shard(path: &Path, tokens: &[u16]) -> Result<PathBuf> {
    let mut w = ShardWriter::create(path)?;
    w.push(tokens)?;
    w.finish()
}

/// The temporary name used while `path` is being written: `.NAME.tmp` in the same directory,
/// so the final rename never crosses a file system.
pub fn temp_name(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

/// Best-effort fsync of the directory holding `path`, so a completed rename survives a crash.
/// (Directories cannot be opened for sync on every platform; a failure here is not an error.)
pub(crate) fn sync_parent(path: &Path) {
    if let Some(dir) = path.parent()
        && let Ok(d) = File::open(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        })
    {
        let _ = d.sync_all();
    }
}

/// True when `name` is a shard of `split`: it ends in `.bin`, does not start with `.`, and one of
/// its `_`-separated parts is the split name. This matches Lathe's `train_000000.bin` and llm.c's
/// `fineweb_train_000001.bin` and `tinyshakespeare_val.bin`.
pub fn is_split_shard_name(name: &str, split: Split) -> bool {
    if name.starts_with('.') {
        return false;
    }
    let Some(stem) = name.strip_suffix(".bin") else {
        return false;
    };
    stem.split('_').any(|part| part == split.name())
}

/// The shards of `split` under `path`, sorted by file name.
///
/// `path` may also be a single shard file: a file named for a split (`x_train.bin`) serves that
/// split, and its sibling with the split part renamed (`x_val.bin`) serves the other; a file
/// named for neither (`tokens.bin`) serves the train split only, so training data is never
/// silently reused for validation.
pub fn find_shards(path: &Path, split: Split) -> Result<Vec<PathBuf>> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(DataError::MissingData {
                path: path.to_path_buf(),
            });
        }
        Err(e) => return Err(DataError::io("cannot read data path", path, e)),
    };
    if meta.is_file() {
        return single_file_shard(path, split);
    }
    let mut found = Vec::new();
    let entries =
        fs::read_dir(path).map_err(|e| DataError::io("cannot list data directory", path, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| DataError::io("cannot list data directory", path, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if is_split_shard_name(name, split) {
            found.push(entry.path());
        }
    }
    if found.is_empty() {
        return Err(DataError::NoShards {
            path: path.to_path_buf(),
            split: split.name(),
        });
    }
    found.sort();
    Ok(found)
}

fn single_file_shard(path: &Path, split: Split) -> Result<Vec<PathBuf>> {
    let no_shards = || DataError::NoShards {
        path: path.to_path_buf(),
        split: split.name(),
    };
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(no_shards)?;
    let other = match split {
        Split::Train => Split::Val,
        Split::Val => Split::Train,
    };
    if is_split_shard_name(name, split) {
        return Ok(vec![path.to_path_buf()]);
    }
    if is_split_shard_name(name, other) {
        let stem = &name[..name.len() - ".bin".len()];
        let parts: Vec<&str> = stem
            .split('_')
            .map(|p| if p == other.name() { split.name() } else { p })
            .collect();
        let sibling = path.with_file_name(format!("{}.bin", parts.join("_")));
        if sibling.is_file() {
            return Ok(vec![sibling]);
        }
        return Err(no_shards());
    }
    match split {
        Split::Train => Ok(vec![path.to_path_buf()]),
        Split::Val => Err(no_shards()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_names() {
        assert!(is_split_shard_name("train_000000.bin", Split::Train));
        assert!(is_split_shard_name(
            "fineweb_train_000001.bin",
            Split::Train
        ));
        assert!(is_split_shard_name("tinyshakespeare_val.bin", Split::Val));
        assert!(!is_split_shard_name(
            "tinyshakespeare_val.bin",
            Split::Train
        ));
        assert!(!is_split_shard_name(".train_000000.bin.tmp", Split::Train));
        assert!(!is_split_shard_name("trainer_000000.bin", Split::Train));
        assert!(!is_split_shard_name("train_000000.txt", Split::Train));
    }

    #[test]
    fn single_file_paths_pick_the_split() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let (train, val, plain) = (
            d.join("ts_train.bin"),
            d.join("ts_val.bin"),
            d.join("tok.bin"),
        );
        for p in [&train, &plain] {
            write_shard(p, &[1, 2, 3]).unwrap();
        }
        assert_eq!(
            find_shards(&train, Split::Train).unwrap(),
            vec![train.clone()]
        );
        // The val sibling does not exist yet: no val data rather than the train file.
        assert!(matches!(
            find_shards(&train, Split::Val),
            Err(DataError::NoShards { .. })
        ));
        write_shard(&val, &[4, 5]).unwrap();
        assert_eq!(find_shards(&train, Split::Val).unwrap(), vec![val.clone()]);
        assert_eq!(
            find_shards(&val, Split::Train).unwrap(),
            vec![train.clone()]
        );
        assert_eq!(
            find_shards(&plain, Split::Train).unwrap(),
            vec![plain.clone()]
        );
        assert!(find_shards(&plain, Split::Val).is_err());
        // A directory lists both splits, sorted, ignoring other files.
        assert_eq!(find_shards(d, Split::Train).unwrap(), vec![train]);
        assert_eq!(find_shards(d, Split::Val).unwrap(), vec![val]);
    }

    #[test]
    fn header_layout() {
        let h = header_bytes(7);
        assert_eq!(&h[0..4], &20240520i32.to_le_bytes());
        assert_eq!(&h[4..8], &1i32.to_le_bytes());
        assert_eq!(&h[8..12], &7i32.to_le_bytes());
        assert!(h[12..].iter().all(|&b| b == 0));
    }
}
