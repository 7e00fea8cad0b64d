//! GPT-2: token + position embeddings, pre-LN blocks (causal self-attention, GELU MLP), final
//! layernorm, LM head tied to the token embedding.
//!
//! Parameters are named and laid out as Hugging Face's GPT-2 (Conv1D weights are `(in, out)`),
//! so checkpoints convert by name:
//!
//! ```text
//! wte.weight (Vp, C)   wpe.weight (T, C)
//! h.{i}.ln_1.weight (C)            h.{i}.ln_1.bias (C)
//! h.{i}.attn.c_attn.weight (C, 3C) h.{i}.attn.c_attn.bias (3C)
//! h.{i}.attn.c_proj.weight (C, C)  h.{i}.attn.c_proj.bias (C)
//! h.{i}.ln_2.weight (C)            h.{i}.ln_2.bias (C)
//! h.{i}.mlp.c_fc.weight (C, 4C)    h.{i}.mlp.c_fc.bias (4C)
//! h.{i}.mlp.c_proj.weight (4C, C)  h.{i}.mlp.c_proj.bias (C)
//! ln_f.weight (C)                  ln_f.bias (C)
//! ```

use lathe_kernels::rng::Rng;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::models::config::GptConfig;
use crate::ops::attention::AttentionPath;
use crate::ops::loss::IGNORE_INDEX;
use crate::ops::norm::LAYERNORM_EPS;
use crate::params::{ParamSpec, ParamStore};
use crate::recompute::Recompute;
use crate::scalar::Scalar;
use crate::tape::{Tape, Var};

/// A GPT-2 style language model. Holds only the configuration; parameters live in a
/// [`ParamStore`] and activations on a [`Tape`].
#[derive(Clone, Debug)]
pub struct Gpt {
    cfg: GptConfig,
}

/// Activation memory of one training step, from a dry run of the tape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActivationMemory {
    /// Live activation bytes when the forward (loss included) ends.
    pub after_forward_bytes: usize,
    /// Peak live activation bytes over forward and backward (values and activation gradients).
    pub peak_bytes: usize,
}

impl Gpt {
    /// A model of `cfg` (validated).
    pub fn new(cfg: GptConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Gpt { cfg })
    }

    /// The configuration.
    pub fn config(&self) -> &GptConfig {
        &self.cfg
    }

    /// Names, shapes and decay flags of every parameter, in layout order.
    pub fn param_specs(&self) -> Vec<ParamSpec> {
        let GptConfig {
            padded_vocab_size: vp,
            block_size: t,
            n_embd: c,
            ..
        } = self.cfg;
        let mut s = vec![
            ParamSpec::new("wte.weight", [vp, c], true),
            ParamSpec::new("wpe.weight", [t, c], true),
        ];
        for i in 0..self.cfg.n_layer {
            let p = |n: &str| format!("h.{i}.{n}");
            s.extend([
                ParamSpec::new(p("ln_1.weight"), [c], false),
                ParamSpec::new(p("ln_1.bias"), [c], false),
                ParamSpec::new(p("attn.c_attn.weight"), [c, 3 * c], true),
                ParamSpec::new(p("attn.c_attn.bias"), [3 * c], false),
                ParamSpec::new(p("attn.c_proj.weight"), [c, c], true),
                ParamSpec::new(p("attn.c_proj.bias"), [c], false),
                ParamSpec::new(p("ln_2.weight"), [c], false),
                ParamSpec::new(p("ln_2.bias"), [c], false),
                ParamSpec::new(p("mlp.c_fc.weight"), [c, 4 * c], true),
                ParamSpec::new(p("mlp.c_fc.bias"), [4 * c], false),
                ParamSpec::new(p("mlp.c_proj.weight"), [4 * c, c], true),
                ParamSpec::new(p("mlp.c_proj.bias"), [c], false),
            ]);
        }
        s.extend([
            ParamSpec::new("ln_f.weight", [c], false),
            ParamSpec::new("ln_f.bias", [c], false),
        ]);
        s
    }

    /// GPT-2 initialisation from `seed`: weights and embeddings normal(0, 0.02), residual
    /// projections (`attn.c_proj`, `mlp.c_proj`) normal(0, 0.02 / sqrt(2 n_layer)), biases 0,
    /// layernorm weights 1; padding rows of `wte` are 0. The working copy is synced in f32.
    pub fn init_params(&self, seed: u64) -> ParamStore {
        let specs = self.param_specs();
        let mut store = ParamStore::<f32>::new(&specs).expect("GPT parameter names are unique");
        let mut rng = Rng::new(seed);
        let resid_std = 0.02 / (2.0 * self.cfg.n_layer as f32).sqrt();
        let (v, c) = (self.cfg.vocab_size, self.cfg.n_embd);
        for view in store.views().to_vec() {
            let dst = &mut store.master_mut()[view.range()];
            let name = view.name.as_str();
            if name.ends_with("ln_1.weight")
                || name.ends_with("ln_2.weight")
                || name == "ln_f.weight"
            {
                dst.fill(1.0);
            } else if name.ends_with(".bias") {
                dst.fill(0.0);
            } else {
                let std = if name.ends_with("c_proj.weight") {
                    resid_std
                } else {
                    0.02
                };
                let n = if name == "wte.weight" {
                    v * c
                } else {
                    dst.len()
                };
                for x in &mut dst[..n] {
                    *x = std * rng.normal();
                }
                dst[n..].fill(0.0);
            }
        }
        store.sync_working(DType::F32);
        store
    }

    fn check_batch(&self, what: &'static str, tokens: &[u32], b: usize, t: usize) -> Result<()> {
        let inv = |d: String| {
            Err(Error::Invalid {
                op: what,
                detail: d,
            })
        };
        if b == 0 || t == 0 {
            return inv(format!("batch {b} x length {t} must be non-empty"));
        }
        if t > self.cfg.block_size {
            return inv(format!(
                "sequence length {t} exceeds block_size {}",
                self.cfg.block_size
            ));
        }
        if tokens.len() != b * t {
            return inv(format!(
                "{} tokens given for a batch of {b} x {t}",
                tokens.len()
            ));
        }
        if let Some((pos, &tok)) = tokens
            .iter()
            .enumerate()
            .find(|&(_, &x)| x as usize >= self.cfg.vocab_size)
        {
            return inv(format!(
                "token {tok} at position {pos} is not < vocab_size {}",
                self.cfg.vocab_size
            ));
        }
        Ok(())
    }

    /// The final hidden states `(B, T, C)` after `ln_f`. `tokens` is `(B, T)` row-major.
    #[allow(clippy::too_many_arguments)]
    pub fn hidden<T: Scalar>(
        &self,
        tape: &mut Tape<T>,
        params: &ParamStore<T>,
        tokens: &[u32],
        b: usize,
        t: usize,
        recompute: Recompute,
    ) -> Result<Var> {
        self.check_batch("Gpt::forward", tokens, b, t)?;
        let wte = tape.param(params, "wte.weight")?;
        let wpe = tape.param(params, "wpe.weight")?;
        let tok = tape.embedding(wte, tokens, &[b, t])?;
        let positions: Vec<u32> = (0..t as u32).collect();
        let pos = tape.embedding(wpe, &positions, &[t])?;
        let mut x = tape.bias_add(tok, pos)?;
        for l in 0..self.cfg.n_layer {
            x = match recompute {
                Recompute::Block => {
                    tape.checkpoint(|tp| self.block(tp, params, l, x, Recompute::None))?
                }
                r => self.block(tape, params, l, x, r)?,
            };
        }
        let (w, bias) = (
            tape.param(params, "ln_f.weight")?,
            tape.param(params, "ln_f.bias")?,
        );
        tape.layernorm(x, w, bias, LAYERNORM_EPS)
    }

    /// One pre-LN transformer block on `x` `(B, T, C)`. With `Recompute::Act` the layernorm
    /// and GELU outputs are dropped once consumed and recomputed in the backward.
    fn block<T: Scalar>(
        &self,
        tape: &mut Tape<T>,
        params: &ParamStore<T>,
        l: usize,
        x: Var,
        recompute: Recompute,
    ) -> Result<Var> {
        let act = recompute == Recompute::Act;
        let p = |tape: &mut Tape<T>, n: &str| tape.param(params, &format!("h.{l}.{n}"));
        let (w, b) = (p(tape, "ln_1.weight")?, p(tape, "ln_1.bias")?);
        let h = tape.layernorm(x, w, b, LAYERNORM_EPS)?;
        let (w, b) = (p(tape, "attn.c_attn.weight")?, p(tape, "attn.c_attn.bias")?);
        let qkv = tape.linear(h, w, Some(b))?;
        if act {
            tape.drop_for_recompute(h)?;
        }
        let a = tape.attention(qkv, self.cfg.n_head)?;
        let (w, b) = (p(tape, "attn.c_proj.weight")?, p(tape, "attn.c_proj.bias")?);
        let o = tape.linear(a, w, Some(b))?;
        let x1 = tape.add(x, o)?;
        let (w, b) = (p(tape, "ln_2.weight")?, p(tape, "ln_2.bias")?);
        let h2 = tape.layernorm(x1, w, b, LAYERNORM_EPS)?;
        let (w, b) = (p(tape, "mlp.c_fc.weight")?, p(tape, "mlp.c_fc.bias")?);
        let f = tape.linear(h2, w, Some(b))?;
        if act {
            tape.drop_for_recompute(h2)?;
        }
        let g = tape.gelu(f)?;
        let (w, b) = (p(tape, "mlp.c_proj.weight")?, p(tape, "mlp.c_proj.bias")?);
        let m = tape.linear(g, w, Some(b))?;
        if act {
            tape.drop_for_recompute(g)?;
        }
        tape.add(x1, m)
    }

    /// Logits `(B, T, Vp)` in the compute dtype; columns `vocab_size..Vp` are padding.
    #[allow(clippy::too_many_arguments)]
    pub fn logits<T: Scalar>(
        &self,
        tape: &mut Tape<T>,
        params: &ParamStore<T>,
        tokens: &[u32],
        b: usize,
        t: usize,
        recompute: Recompute,
    ) -> Result<Var> {
        let h = self.hidden(tape, params, tokens, b, t, recompute)?;
        let wte = tape.param(params, "wte.weight")?;
        tape.matmul(h, wte, false, true)
    }

    /// Mean next-token cross-entropy (rank-0, f32) of `tokens` `(B, T)` against `targets`
    /// `(B, T)`; targets equal to [`IGNORE_INDEX`] are not scored.
    #[allow(clippy::too_many_arguments)]
    pub fn loss<T: Scalar>(
        &self,
        tape: &mut Tape<T>,
        params: &ParamStore<T>,
        tokens: &[u32],
        targets: &[u32],
        b: usize,
        t: usize,
        recompute: Recompute,
    ) -> Result<Var> {
        if targets.len() != tokens.len() {
            return Err(Error::Invalid {
                op: "Gpt::loss",
                detail: format!("{} targets for {} tokens", targets.len(), tokens.len()),
            });
        }
        let logits = self.logits(tape, params, tokens, b, t, recompute)?;
        tape.cross_entropy(logits, targets, self.cfg.vocab_size, IGNORE_INDEX)
    }

    /// Logits of the last position of each sequence, `(B, 1, Vp)` (the LM head runs on that
    /// position only).
    pub fn last_logits<T: Scalar>(
        &self,
        tape: &mut Tape<T>,
        params: &ParamStore<T>,
        tokens: &[u32],
        b: usize,
        t: usize,
    ) -> Result<Var> {
        let h = self.hidden(tape, params, tokens, b, t, Recompute::None)?;
        let last = if t > 1 {
            tape.split(h, 1, &[t - 1, 1])?[1]
        } else {
            h
        };
        let wte = tape.param(params, "wte.weight")?;
        tape.matmul(last, wte, false, true)
    }

    /// Greedy decoding of one prompt: returns up to `max_new` new tokens, stopping after
    /// `stop_token` (which is not included). Runs in the store's working dtype; each step is
    /// a forward over the last `block_size` tokens.
    pub fn generate_greedy(
        &self,
        params: &ParamStore,
        prompt: &[u32],
        max_new: usize,
        stop_token: Option<u32>,
    ) -> Result<Vec<u32>> {
        let mut out = self.generate_greedy_batch(params, &[prompt], max_new, stop_token)?;
        Ok(out.remove(0))
    }

    /// [`Gpt::generate_greedy`] for several prompts of equal length, decoded as one batch.
    pub fn generate_greedy_batch(
        &self,
        params: &ParamStore,
        prompts: &[&[u32]],
        max_new: usize,
        stop_token: Option<u32>,
    ) -> Result<Vec<Vec<u32>>> {
        let inv = |d: String| Error::Invalid {
            op: "Gpt::generate_greedy",
            detail: d,
        };
        let len0 = prompts.first().map_or(0, |p| p.len());
        if len0 == 0 || prompts.iter().any(|p| p.len() != len0) {
            return Err(inv("prompts must be non-empty and of equal length".into()));
        }
        let n = prompts.len();
        let (v, vp) = (self.cfg.vocab_size, self.cfg.padded_vocab_size);
        let mut seqs: Vec<Vec<u32>> = prompts.iter().map(|p| p.to_vec()).collect();
        let mut out = vec![Vec::new(); n];
        let mut done = vec![false; n];
        // On the device of a device store (one explicit read of the last logits a step).
        let mut tape = match params.device() {
            Some(d) => Tape::on_device(params.working_dtype(), d.device()),
            None => Tape::new(params.working_dtype()),
        };
        for _ in 0..max_new {
            if done.iter().all(|&d| d) {
                break;
            }
            let len = seqs[0].len();
            let start = len.saturating_sub(self.cfg.block_size);
            let t = len - start;
            let toks: Vec<u32> = seqs
                .iter()
                .flat_map(|s| s[start..].iter().copied())
                .collect();
            tape.clear();
            let logits = self.last_logits(&mut tape, params, &toks, n, t)?;
            let vals = tape.read(logits)?;
            for i in 0..n {
                let row = &vals[i * vp..i * vp + v];
                let mut best = 0;
                for (j, &x) in row.iter().enumerate() {
                    if x > row[best] {
                        best = j;
                    }
                }
                let tok = best as u32;
                seqs[i].push(tok);
                if !done[i] {
                    if Some(tok) == stop_token {
                        done[i] = true;
                    } else {
                        out[i].push(tok);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Activation memory of one forward+backward on a `(b, t)` batch in `dtype` under
    /// `recompute`, measured by a dry run of the tape: the exact accounting of a real run
    /// (validated against one in the tests), computed without allocating or computing values,
    /// so it works at any size (e.g. gpt2-124m at T = 1024).
    pub fn activation_memory(
        &self,
        b: usize,
        t: usize,
        dtype: DType,
        recompute: Recompute,
    ) -> Result<ActivationMemory> {
        self.activation_memory_with(b, t, dtype, recompute, AttentionPath::Materialized)
    }

    /// [`Gpt::activation_memory`] with attention recorded as `attention` (the flash path
    /// keeps a `(B, nh, T)` log-sum-exp per layer where the materialised one keeps the
    /// `(B, nh, T, T)` probabilities). Kernel scratch outside the tape is not counted.
    pub fn activation_memory_with(
        &self,
        b: usize,
        t: usize,
        dtype: DType,
        recompute: Recompute,
        attention: AttentionPath,
    ) -> Result<ActivationMemory> {
        let mut layout = ParamStore::<f32>::layout(&self.param_specs())?;
        let mut tape = Tape::<f32>::dry_run(dtype);
        tape.set_attention_path(attention);
        let tokens = vec![0u32; b * t];
        let loss = self.loss(&mut tape, &layout, &tokens, &tokens, b, t, recompute)?;
        let after_forward_bytes = tape.live_activation_bytes();
        tape.backward(loss, 1.0, &mut layout)?;
        Ok(ActivationMemory {
            after_forward_bytes,
            peak_bytes: tape.peak_activation_bytes(),
        })
    }
}
