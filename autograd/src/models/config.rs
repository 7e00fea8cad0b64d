//! GPT configurations and named presets.

use crate::error::{Error, Result};

/// Shape of a GPT-2 style model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GptConfig {
    /// Tokens the model can see and predict.
    pub vocab_size: usize,
    /// Rows of the token embedding (>= `vocab_size`, padded for GEMM-friendly shapes); the
    /// extra logits are ignored by the loss and by decoding.
    pub padded_vocab_size: usize,
    /// Transformer blocks.
    pub n_layer: usize,
    /// Attention heads per block.
    pub n_head: usize,
    /// Width of the residual stream (C).
    pub n_embd: usize,
    /// Maximum sequence length (rows of the position embedding).
    pub block_size: usize,
}

/// Vocabulary sizes are padded to a multiple of this (50257 -> 50304, as llm.c).
pub const VOCAB_PAD: usize = 64;

impl GptConfig {
    /// Names accepted by [`GptConfig::from_name`].
    pub const PRESETS: [&'static str; 3] = ["tiny", "small", "gpt2-124m"];

    /// The CPU default: 4 layers, 4 heads, 128 wide, 64 positions, byte vocabulary (256).
    /// A forward+backward of 32 x 64 tokens takes a fraction of a second on two cores.
    pub fn tiny() -> Self {
        GptConfig {
            vocab_size: 256,
            padded_vocab_size: 256,
            n_layer: 4,
            n_head: 4,
            n_embd: 128,
            block_size: 64,
        }
    }

    /// A small GPU model: 6 layers, 6 heads, 384 wide, 256 positions, GPT-2 vocabulary.
    pub fn small() -> Self {
        GptConfig {
            vocab_size: 50257,
            padded_vocab_size: 50304,
            n_layer: 6,
            n_head: 6,
            n_embd: 384,
            block_size: 256,
        }
    }

    /// GPT-2 124M: 12 layers, 12 heads, 768 wide, 1024 positions, vocab 50257 padded to 50304.
    pub fn gpt2_124m() -> Self {
        GptConfig {
            vocab_size: 50257,
            padded_vocab_size: 50304,
            n_layer: 12,
            n_head: 12,
            n_embd: 768,
            block_size: 1024,
        }
    }

    /// A preset by name (`tiny`, `small`, `gpt2-124m`; `gpt2` is an alias of `gpt2-124m`).
    pub fn from_name(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "tiny" => Ok(Self::tiny()),
            "small" => Ok(Self::small()),
            "gpt2-124m" | "gpt2" | "gpt2_124m" => Ok(Self::gpt2_124m()),
            _ => Err(Error::UnknownModel {
                name: name.to_string(),
                known: Self::PRESETS.join(", "),
            }),
        }
    }

    /// The same model for another vocabulary; the padded size is rounded up to [`VOCAB_PAD`].
    pub fn with_vocab_size(mut self, vocab_size: usize) -> Self {
        self.vocab_size = vocab_size;
        self.padded_vocab_size = vocab_size.div_ceil(VOCAB_PAD).max(1) * VOCAB_PAD;
        self
    }

    /// The same model with another context length.
    pub fn with_block_size(mut self, block_size: usize) -> Self {
        self.block_size = block_size;
        self
    }

    /// Checks the sizes fit together.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.vocab_size == 0 || self.n_layer == 0 || self.n_head == 0 || self.n_embd == 0 {
            return bad(format!("sizes must be > 0: {self:?}"));
        }
        if self.block_size == 0 {
            return bad("block_size must be > 0".into());
        }
        if self.padded_vocab_size < self.vocab_size {
            return bad(format!(
                "padded_vocab_size {} < vocab_size {}",
                self.padded_vocab_size, self.vocab_size
            ));
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return bad(format!(
                "n_embd {} is not divisible by n_head {}",
                self.n_embd, self.n_head
            ));
        }
        if self.vocab_size > u32::MAX as usize {
            return bad("vocab_size must fit in u32 token ids".into());
        }
        Ok(())
    }

    /// Width of one attention head.
    pub fn head_size(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Number of parameters (token embedding counted once: the LM head is tied to it).
    pub fn num_params(&self) -> usize {
        let c = self.n_embd;
        let per_layer = 2 * c
            + (c * 3 * c + 3 * c)
            + (c * c + c)
            + 2 * c
            + (c * 4 * c + 4 * c)
            + (4 * c * c + c);
        self.padded_vocab_size * c + self.block_size * c + self.n_layer * per_layer + 2 * c
    }

    /// Training FLOPs per token at sequence length `t` (forward + backward), as llm.c counts
    /// them for MFU: `6 N + 12 L C T`.
    pub fn flops_per_token(&self, t: usize) -> f64 {
        6.0 * self.num_params() as f64 + 12.0 * (self.n_layer * self.n_embd * t) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_and_padding() {
        let g = GptConfig::from_name("gpt2-124m").unwrap();
        assert_eq!(
            (g.n_layer, g.n_head, g.n_embd, g.block_size),
            (12, 12, 768, 1024)
        );
        assert_eq!(g.padded_vocab_size, 50304);
        assert_eq!(
            GptConfig::tiny().with_vocab_size(50257).padded_vocab_size,
            50304
        );
        assert_eq!(GptConfig::tiny().with_vocab_size(13).padded_vocab_size, 64);
        let e = GptConfig::from_name("huge").unwrap_err().to_string();
        assert!(e.contains("tiny") && e.contains("huge"), "{e}");
        // GPT-2 small has 124,475,904 parameters with the padded vocabulary (llm.c's count).
        assert_eq!(g.num_params(), 124_475_904);
        for name in GptConfig::PRESETS {
            GptConfig::from_name(name).unwrap().validate().unwrap();
        }
        let mut bad = GptConfig::tiny();
        bad.n_head = 3;
        assert!(bad.validate().is_err());
    }
}
