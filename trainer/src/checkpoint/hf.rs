//! Checkpoints Hugging Face `transformers` loads as they are:
//! `GPT2LMHeadModel.from_pretrained(step_dir)` reads the step directory's `config.json` and
//! `model.safetensors` with no hand-written config and no logit slicing.
//!
//! Lathe pads the token embedding `wte` to a multiple of 128 rows for GEMM-friendly shapes;
//! those rows are an internal layout (initialised to zero and never trained: no token selects
//! them and the loss ignores their logits). `model.safetensors` therefore stores `wte.weight`
//! with exactly `vocab_size` rows ([`export_layout`]), and loading restores the padding rows as
//! zeros. The other tensors already carry GPT-2's names and shapes (`Conv1D` weights stored
//! `(in, out)`), and the output projection is tied to `wte` as in GPT-2.

use serde_json::{Value, json};

use crate::optim::{LayoutError, ParamLayout, ParamView};

/// File name of the Hugging Face model configuration inside a checkpoint directory.
pub const HF_CONFIG_FILE: &str = "config.json";

/// Name of the token embedding, whose padding rows are not stored.
pub const WTE: &str = "wte.weight";

/// The model's shape, as `config.json` records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gpt2Shape {
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
}

/// `config.json` for `transformers.GPT2LMHeadModel`: GPT-2's architecture as Lathe computes
/// it (tanh GELU = `gelu_new`, layer norm epsilon 1e-5, tied embeddings, no dropout at
/// inference). `eos` is the document separator, when the data has one.
pub fn gpt2_config(shape: &Gpt2Shape, eos: Option<u32>) -> Value {
    let mut v = json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": shape.vocab_size,
        "n_positions": shape.n_positions,
        "n_ctx": shape.n_positions,
        "n_embd": shape.n_embd,
        "n_layer": shape.n_layer,
        "n_head": shape.n_head,
        "n_inner": null,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": true,
        "tie_word_embeddings": true,
        "use_cache": true,
        "torch_dtype": "float32",
    });
    if let (Some(e), Some(m)) = (eos, v.as_object_mut()) {
        m.insert("bos_token_id".into(), json!(e));
        m.insert("eos_token_id".into(), json!(e));
    }
    v
}

/// `layout` with `wte.weight` cut to its first `vocab_size` rows (same offset): the tensors
/// `model.safetensors` stores. Elements outside the views (the padding rows) are neither
/// written nor, on load, read; load into a zeroed buffer to restore them.
pub fn export_layout(layout: &ParamLayout, vocab_size: usize) -> Result<ParamLayout, LayoutError> {
    let views = layout
        .views()
        .iter()
        .map(|v| {
            if v.name == WTE && v.shape.len() == 2 && v.shape[0] > vocab_size {
                ParamView::new(v.name.clone(), v.offset, &[vocab_size, v.shape[1]], v.decay)
            } else {
                v.clone()
            }
        })
        .collect();
    ParamLayout::new(views, layout.len())
}

/// Tensor names and shapes `GPT2LMHeadModel` expects for `shape` (the base model's names,
/// which `from_pretrained` accepts without the `transformer.` prefix; `lm_head` is tied).
pub fn gpt2_tensors(shape: &Gpt2Shape) -> Vec<(String, Vec<usize>)> {
    let (c, v, t) = (shape.n_embd, shape.vocab_size, shape.n_positions);
    let mut out = vec![
        (WTE.to_string(), vec![v, c]),
        ("wpe.weight".to_string(), vec![t, c]),
    ];
    for i in 0..shape.n_layer {
        for (n, s) in [
            ("ln_1.weight", vec![c]),
            ("ln_1.bias", vec![c]),
            ("attn.c_attn.weight", vec![c, 3 * c]),
            ("attn.c_attn.bias", vec![3 * c]),
            ("attn.c_proj.weight", vec![c, c]),
            ("attn.c_proj.bias", vec![c]),
            ("ln_2.weight", vec![c]),
            ("ln_2.bias", vec![c]),
            ("mlp.c_fc.weight", vec![c, 4 * c]),
            ("mlp.c_fc.bias", vec![4 * c]),
            ("mlp.c_proj.weight", vec![4 * c, c]),
            ("mlp.c_proj.bias", vec![c]),
        ] {
            out.push((format!("h.{i}.{n}"), s));
        }
    }
    out.push(("ln_f.weight".to_string(), vec![c]));
    out.push(("ln_f.bias".to_string(), vec![c]));
    out
}

/// Loads the master weights of a checkpoint into `master` (`layout.len()` elements, the run's
/// padded layout): `wte.weight` with `vocab_size` rows, the padding rows set to zero; a
/// checkpoint written before Lathe cut the padding (with every padded row stored) loads too.
pub fn load_master(
    reader: &super::CheckpointReader,
    layout: &ParamLayout,
    vocab_size: usize,
    master: &mut [f32],
) -> Result<(), super::CheckpointError> {
    let export = export_layout(layout, vocab_size).map_err(|e| {
        super::CheckpointError::BadRequest(format!("parameter layout without padding: {e}"))
    })?;
    master.fill(0.0);
    match reader.load_model(&export, master) {
        Err(super::CheckpointError::ShapeMismatch { name, .. }) if name == WTE => {
            reader.load_model(layout, master)
        }
        other => other,
    }
}
