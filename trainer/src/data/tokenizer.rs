//! The two tokenizers `lathe prepare` knows: raw bytes, and GPT-2's BPE.
//!
//! - `bytes`: each byte is a token (0..=255); token 256 separates documents; vocabulary 257.
//! - `gpt2`: the GPT-2 byte-pair encoding (`r50k_base`, whose tables are compiled into the
//!   binary by tiktoken-rs: nothing is fetched at run time); `<|endoftext|>` (50256) separates
//!   documents; vocabulary 50257. Text is encoded as ordinary text: a literal `<|endoftext|>` in
//!   a document is spelled out in ordinary tokens, never turned into the separator.

use std::sync::OnceLock;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tiktoken_rs::CoreBPE;

use super::error::{DataError, Result};

/// Which tokenizer turns text into tokens.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum TokenizerKind {
    /// One token per byte, plus the separator 256 (vocabulary 257).
    #[default]
    Bytes,
    /// GPT-2 BPE (`r50k_base`), separator `<|endoftext|>` = 50256 (vocabulary 50257).
    Gpt2,
}

/// The bytes tokenizer's document separator.
pub const BYTES_SEPARATOR: u32 = 256;
/// GPT-2's `<|endoftext|>`.
pub const GPT2_EOT: u32 = 50256;

/// Texts shorter than this are encoded on one thread; longer ones are cut into pieces of about
/// this size at points where the cut cannot change the encoding, and encoded in parallel.
const PARALLEL_CHUNK: usize = 1 << 20;

impl TokenizerKind {
    /// `"bytes"` or `"gpt2"` (the CLI and `meta.json` spelling).
    pub fn name(self) -> &'static str {
        match self {
            TokenizerKind::Bytes => "bytes",
            TokenizerKind::Gpt2 => "gpt2",
        }
    }

    /// Number of distinct tokens, separator included.
    pub fn vocab_size(self) -> u32 {
        match self {
            TokenizerKind::Bytes => 257,
            TokenizerKind::Gpt2 => 50257,
        }
    }

    /// The token placed before every document.
    pub fn separator(self) -> u32 {
        match self {
            TokenizerKind::Bytes => BYTES_SEPARATOR,
            TokenizerKind::Gpt2 => GPT2_EOT,
        }
    }

    /// Encodes one document (without separator).
    pub fn encode(self, text: &str) -> Result<Vec<u32>> {
        match self {
            TokenizerKind::Bytes => Ok(text.bytes().map(u32::from).collect()),
            TokenizerKind::Gpt2 => encode_gpt2(text),
        }
    }

    /// Decodes tokens back to bytes. The separator decodes to `<|endoftext|>` for both
    /// tokenizers; a token outside the vocabulary is an error.
    pub fn decode(self, tokens: &[u32]) -> Result<Vec<u8>> {
        match self {
            TokenizerKind::Bytes => {
                let mut out = Vec::with_capacity(tokens.len());
                for &t in tokens {
                    match t {
                        0..=255 => out.push(t as u8),
                        BYTES_SEPARATOR => out.extend_from_slice(b"<|endoftext|>"),
                        _ => {
                            return Err(DataError::Tokenizer(format!(
                                "token {t} is outside the bytes vocabulary (257)"
                            )));
                        }
                    }
                }
                Ok(out)
            }
            TokenizerKind::Gpt2 => gpt2()?
                .decode_bytes(tokens)
                .map_err(|e| DataError::Tokenizer(format!("gpt2 cannot decode token {}", e.token))),
        }
    }
}

impl std::fmt::Display for TokenizerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The GPT-2 encoder, built once from the tables compiled into tiktoken-rs.
pub fn gpt2() -> Result<&'static CoreBPE> {
    static BPE: OnceLock<std::result::Result<CoreBPE, String>> = OnceLock::new();
    BPE.get_or_init(|| tiktoken_rs::r50k_base().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| DataError::Tokenizer(format!("cannot build the gpt2 tables: {e}")))
}

/// GPT-2 encoding of `text`, identical to `r50k_base().encode_ordinary(text)`, computed in
/// parallel on large texts.
pub fn encode_gpt2(text: &str) -> Result<Vec<u32>> {
    let bpe = gpt2()?;
    let pieces = safe_cuts(text, PARALLEL_CHUNK);
    if pieces.len() <= 1 {
        return Ok(bpe.encode_ordinary(text));
    }
    let parts: Vec<Vec<u32>> = pieces
        .par_iter()
        .map(|&(a, b)| bpe.encode_ordinary(&text[a..b]))
        .collect();
    Ok(parts.concat())
}

/// Cuts `text` into ranges of roughly `target` bytes such that encoding each range on its own
/// gives the same tokens as encoding the whole.
///
/// A cut is placed right after a `\n` whose previous and next characters are both
/// non-whitespace. GPT-2's pre-tokenizer (`'s|'t|... | ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|
/// \s+$|\s+(?!\S)|\s`) then makes that `\n` a piece of its own either way: in the whole text
/// only the final `\s` alternative matches it (the next character is not whitespace), and at the
/// end of a range `\s+$` matches exactly it (the previous character is not whitespace, so no
/// whitespace run extends to the left). The next piece starts at the cut in both cases, and BPE
/// never merges across pieces. Texts without such newlines (e.g. CRLF text) stay one range.
fn safe_cuts(text: &str, target: usize) -> Vec<(usize, usize)> {
    let bytes = text.as_bytes();
    let mut ranges = Vec::new();
    let mut start = 0;
    while text.len() - start > 2 * target {
        let mut cut = None;
        let mut i = start + target;
        while i + 1 < bytes.len() {
            if bytes[i] == b'\n' {
                let prev = text[..i].chars().next_back();
                let next = text[i + 1..].chars().next();
                if matches!((prev, next), (Some(p), Some(n)) if !p.is_whitespace() && !n.is_whitespace())
                {
                    cut = Some(i + 1);
                    break;
                }
            }
            i += 1;
        }
        let Some(cut) = cut else { break };
        ranges.push((start, cut));
        start = cut;
    }
    ranges.push((start, text.len()));
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_parallel_matches_sequential() {
        // Lines with every whitespace shape around newlines (CRLF, blank lines, trailing
        // spaces, tabs, unicode), long enough to be cut into many ranges at a small target.
        let mut text = String::new();
        let lines = [
            "Hello world!",
            "  indented line",
            "trailing spaces   ",
            "",
            "tab\there",
            "crlf line\r",
            "numbers 12345 and 3.14",
            "don't won't it's",
            "übermäßig ünïcödé 東京",
            "\u{2003}em space start",
        ];
        for i in 0..400 {
            text.push_str(lines[i % lines.len()]);
            text.push('\n');
        }
        let bpe = gpt2().unwrap();
        let want = bpe.encode_ordinary(&text);
        let cuts = safe_cuts(&text, 64);
        assert!(cuts.len() > 20, "expected many ranges, got {}", cuts.len());
        let got: Vec<u32> = cuts
            .iter()
            .flat_map(|&(a, b)| bpe.encode_ordinary(&text[a..b]))
            .collect();
        assert_eq!(got, want);
        // The ranges tile the text.
        assert_eq!(cuts[0].0, 0);
        assert_eq!(cuts.last().unwrap().1, text.len());
        assert!(cuts.windows(2).all(|w| w[0].1 == w[1].0));
    }

    #[test]
    fn decode_roundtrip() {
        let text = "The quick brown fox, 1234.\nÜnïcode too.";
        for kind in [TokenizerKind::Bytes, TokenizerKind::Gpt2] {
            let toks = kind.encode(text).unwrap();
            assert!(
                toks.iter()
                    .all(|&t| t < kind.vocab_size() && t != kind.separator())
            );
            assert_eq!(kind.decode(&toks).unwrap(), text.as_bytes());
        }
        assert_eq!(
            TokenizerKind::Gpt2.decode(&[GPT2_EOT]).unwrap(),
            b"<|endoftext|>"
        );
        assert!(TokenizerKind::Bytes.decode(&[300]).is_err());
    }
}
