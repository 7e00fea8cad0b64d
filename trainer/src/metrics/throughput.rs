//! Throughput (tokens per second) and model FLOPs utilisation.

use std::time::Duration;

use crate::precision::Precision;

/// Tokens-per-second meter: the latest step's rate, an exponential moving average of the rates,
/// and the mean over everything measured.
///
/// The EMA starts at the first measured rate (no zero-initialisation bias) and then follows
/// `ema = decay * ema + (1 - decay) * rate`. Steps listed as warm-up (the first `skip` updates,
/// where JIT compilation and allocator growth happen) are not measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Throughput {
    decay: f64,
    skip: u32,
    seen: u64,
    last: Option<f64>,
    ema: Option<f64>,
    tokens: u64,
    secs: f64,
}

impl Throughput {
    /// A meter with EMA `decay` in `[0, 1)` (clamped; e.g. 0.9) that ignores the first `skip`
    /// updates.
    pub fn new(decay: f64, skip: u32) -> Self {
        let decay = if decay.is_finite() {
            decay.clamp(0.0, 0.999_999)
        } else {
            0.0
        };
        Throughput {
            decay,
            skip,
            seen: 0,
            last: None,
            ema: None,
            tokens: 0,
            secs: 0.0,
        }
    }

    /// Records a step that processed `tokens` in `elapsed`; returns the smoothed rate (None while
    /// warming up or if nothing was measured yet). A zero duration is ignored.
    pub fn update(&mut self, tokens: u64, elapsed: Duration) -> Option<f64> {
        self.seen += 1;
        let secs = elapsed.as_secs_f64();
        if self.seen <= self.skip as u64 || secs <= 0.0 {
            return self.ema;
        }
        let rate = tokens as f64 / secs;
        self.last = Some(rate);
        self.ema = Some(match self.ema {
            None => rate,
            Some(e) => self.decay * e + (1.0 - self.decay) * rate,
        });
        self.tokens += tokens;
        self.secs += secs;
        self.ema
    }

    /// Rate of the last measured step.
    pub fn last(&self) -> Option<f64> {
        self.last
    }

    /// Smoothed rate.
    pub fn ema(&self) -> Option<f64> {
        self.ema
    }

    /// Measured tokens / measured seconds (warm-up excluded).
    pub fn mean(&self) -> Option<f64> {
        (self.secs > 0.0).then(|| self.tokens as f64 / self.secs)
    }
}

/// The sizes that decide a GPT's training FLOPs per token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GptFlopsShape {
    /// Parameter count N. llm.c passes every parameter (tied embedding included); PaLM's
    /// appendix B excludes embeddings. The caller chooses and should say which.
    pub n_params: u64,
    /// Layers L.
    pub n_layer: u64,
    /// Attention heads H.
    pub n_head: u64,
    /// Head dimension Q (so H * Q is the model width).
    pub head_dim: u64,
    /// Sequence length T.
    pub seq_len: u64,
}

/// Training FLOPs per token of a GPT (forward + backward, no recomputation counted):
/// `6 N + 12 L H Q T` (PaLM, Chowdhery et al. 2022, appendix B; llm.c's MFU estimate). The
/// first term is the weight matmuls (2 forward + 4 backward per parameter), the second the
/// attention scores and weighted sum.
pub fn gpt_flops_per_token(s: &GptFlopsShape) -> f64 {
    6.0 * s.n_params as f64
        + 12.0 * s.n_layer as f64 * s.n_head as f64 * s.head_dim as f64 * s.seq_len as f64
}

/// Model FLOPs utilisation: achieved model FLOP/s over the hardware peak, as a fraction.
/// `tokens_per_s` counts all devices' tokens when `peak_flops` is the sum of their peaks.
pub fn mfu(flops_per_token: f64, tokens_per_s: f64, peak_flops: f64) -> Option<f64> {
    (peak_flops > 0.0 && tokens_per_s.is_finite())
        .then(|| flops_per_token * tokens_per_s / peak_flops)
}

/// Dense peak FLOP/s of one known GPU for a precision, from NVIDIA's datasheets (tensor cores
/// for bf16/fp16; the non-tensor FP32 rate for `fp32`). Matches on the device name CUDA
/// reports; `None` for devices not in the table (pass a figure of your own then).
pub fn peak_flops(device_name: &str, precision: Precision) -> Option<f64> {
    // (name fragment, bf16/fp16 dense tensor, fp32 non-tensor), most specific first.
    const TABLE: [(&str, f64, f64); 4] = [
        ("H100 PCIe", 756.0e12, 51.2e12),
        ("H100", 989.4e12, 66.9e12),
        ("H200", 989.4e12, 66.9e12),
        ("A100", 312.0e12, 19.5e12),
    ];
    let (_, half, single) = TABLE
        .iter()
        .find(|(frag, _, _)| device_name.contains(frag))?;
    Some(match precision {
        Precision::Fp32 => *single,
        Precision::Bf16 | Precision::Fp16 => *half,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meter_skips_warmup_and_smooths() {
        let mut t = Throughput::new(0.5, 1);
        assert_eq!(t.update(1000, Duration::from_secs(10)), None);
        assert_eq!(t.update(1000, Duration::from_secs(1)), Some(1000.0));
        assert_eq!(t.update(3000, Duration::from_secs(1)), Some(2000.0));
        assert_eq!(t.last(), Some(3000.0));
        assert_eq!(t.mean(), Some(2000.0));
        assert_eq!(t.update(5, Duration::ZERO), Some(2000.0));
    }

    #[test]
    fn gpt2_small_flops_and_mfu() {
        // GPT-2 small: 124M parameters, 12 layers, 12 heads of 64, T = 1024.
        let s = GptFlopsShape {
            n_params: 124_475_904,
            n_layer: 12,
            n_head: 12,
            head_dim: 64,
            seq_len: 1024,
        };
        let f = gpt_flops_per_token(&s);
        assert_eq!(f, 6.0 * 124_475_904.0 + 12.0 * 12.0 * 768.0 * 1024.0);
        let peak = peak_flops("NVIDIA H100 80GB HBM3", Precision::Bf16).unwrap();
        let u = mfu(f, 1.0e6, peak).unwrap();
        assert!((u - f * 1.0e6 / 989.4e12).abs() < 1e-15);
        assert_eq!(
            peak_flops("NVIDIA H100 PCIe", Precision::Fp32),
            Some(51.2e12)
        );
        assert_eq!(peak_flops("NVIDIA GeForce GTX 1080", Precision::Bf16), None);
        assert_eq!(mfu(f, 1.0, 0.0), None);
    }
}
