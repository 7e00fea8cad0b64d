//! File digests recorded in `state.json`, to catch corrupted checkpoint files.
//!
//! The digest is not cryptographic; it catches torn writes and bit rot. The file is cut into
//! 1 MiB chunks; each chunk hashes its little-endian 64-bit words (zero-padded tail) with
//! `h = (rotl(h, 5) ^ w) * K`, seeded by the chunk length and finished with `mix64`; the chunk
//! hashes then combine in order the same way. Chunks hash in parallel on load (from a memory
//! map) and sequentially on save (reading the file back), with the same result.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use rayon::prelude::*;

use crate::optim::mix64;

const CHUNK: usize = 1 << 20;
const K: u64 = 0x517C_C1B7_2722_0A95;

/// Name of the digest scheme, stored with each value.
pub(crate) const SCHEME: &str = "rotmul64-1MiB";

#[inline]
fn step(h: u64, w: u64) -> u64 {
    (h.rotate_left(5) ^ w).wrapping_mul(K)
}

fn chunk_hash(bytes: &[u8]) -> u64 {
    let mut h = step(0, bytes.len() as u64);
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let mut a = [0u8; 8];
        a.copy_from_slice(w);
        h = step(h, u64::from_le_bytes(a));
    }
    let tail = words.remainder();
    if !tail.is_empty() {
        let mut a = [0u8; 8];
        a[..tail.len()].copy_from_slice(tail);
        h = step(h, u64::from_le_bytes(a));
    }
    mix64(h)
}

fn combine(chunks: impl IntoIterator<Item = u64>, total: u64) -> u64 {
    mix64(chunks.into_iter().fold(step(0, total), step))
}

/// Digest of a byte buffer (parallel over chunks).
pub(crate) fn digest_bytes(bytes: &[u8]) -> u64 {
    let hashes: Vec<u64> = bytes.par_chunks(CHUNK).map(chunk_hash).collect();
    combine(hashes, bytes.len() as u64)
}

/// Length and digest of a file, read sequentially.
pub(crate) fn digest_file(path: &Path) -> io::Result<(u64, u64)> {
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; CHUNK];
    let mut hashes = Vec::new();
    let mut total = 0u64;
    loop {
        let mut filled = 0;
        while filled < CHUNK {
            let n = f.read(&mut buf[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        hashes.push(chunk_hash(&buf[..filled]));
        total += filled as u64;
        if filled < CHUNK {
            break;
        }
    }
    Ok((total, combine(hashes, total)))
}

/// Digest of a JSON value without its `state_digest` key: the value is written as compact
/// JSON (keys in the order the map holds them, the same for a value built from the state and
/// one parsed back from the file) and hashed like a file.
pub(crate) fn state_digest(state: &serde_json::Value) -> String {
    let mut v = state.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("state_digest");
    }
    // A `Value` always serializes.
    let bytes = serde_json::to_vec(&v).unwrap_or_default();
    format(digest_bytes(&bytes))
}

/// The text stored in `state.json`.
pub(crate) fn format(d: u64) -> String {
    format!("{SCHEME}:{d:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_and_buffer_digests_agree_and_see_one_bit() {
        let dir = tempfile::tempdir().unwrap();
        for n in [0usize, 5, CHUNK, 2 * CHUNK + 13] {
            let bytes: Vec<u8> = (0..n).map(|i| (i * 31 % 251) as u8).collect();
            let p = dir.path().join(format!("f{n}"));
            std::fs::write(&p, &bytes).unwrap();
            let (len, d) = digest_file(&p).unwrap();
            assert_eq!(len, n as u64);
            assert_eq!(d, digest_bytes(&bytes));
            if n > 0 {
                for bit in [0, 7, 63] {
                    let mut flipped = bytes.clone();
                    let i = (n - 1).min(bit * 1000);
                    flipped[i] ^= 1 << (bit % 8);
                    assert_ne!(digest_bytes(&flipped), d, "n {n} bit {bit}");
                }
            }
        }
        // Two flips of the same high bit in different words do not cancel.
        let mut a = vec![0u8; 64];
        let base = digest_bytes(&a);
        a[7] ^= 0x80;
        a[15] ^= 0x80;
        assert_ne!(digest_bytes(&a), base);
    }
}
