//! Checkpoints of a run: what is saved, and restoring it so a resumed run continues exactly.
//!
//! A checkpoint always holds the full model and optimizer state, whatever the ZeRO stage: on
//! save the shards are gathered to rank 0, which writes; on resume every rank reads the full
//! state and keeps its shard. So one checkpoint resumes under any stage (stages give identical
//! steps) and with or without offload; the world size must match (it fixes the data order and
//! the reduction order).

use super::Trainer;
use crate::checkpoint::{
    CheckpointReader, OptimizerSnapshot, SaveRequest, hf, prune_run, remove_all_but, save,
};
use crate::data::LoaderPosition;
use crate::early_stop::EarlyStopping;
use anyhow::{Context, Result, bail};
use lathe_host::comm::Communicator;
use lathe_kernels::rng::Rng;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::path::Path;

/// Settings that must match between a run and the checkpoint it resumes from (the others,
/// such as `--steps`, `--log` or `--save-every`, may change).
const MUST_MATCH: &[&str] = &[
    "model",
    "data",
    "precision",
    "micro_batch",
    "seq_len",
    "accum",
    "world",
    "optimizer",
    "weight_decay",
    "momentum",
    "seed",
    "stochastic_rounding",
    "curriculum",
];

impl Trainer {
    fn model_config_json(&self) -> Value {
        let c = self.model.config();
        json!({
            "architecture": "gpt2",
            "vocab_size": c.vocab_size,
            "padded_vocab_size": c.padded_vocab_size,
            "n_layer": c.n_layer,
            "n_head": c.n_head,
            "n_embd": c.n_embd,
            "n_positions": c.block_size,
            "seq_len": self.seq_len,
        })
    }

    /// Writes `SAVE/step-NNNNNNNN/` atomically and prunes old ones (`--keep-last`). A
    /// collective from stage 1 on (the shards are gathered to rank 0, which writes).
    pub(super) fn save_checkpoint(&mut self) -> Result<()> {
        let Some(dir) = self.cfg.save.clone() else {
            return Ok(());
        };
        let dir = dir.as_path();
        self.sync_device_to_host()?;
        let master = self.zero.master_on_root(&self.comm)?;
        let optimizer = self.zero.optimizer_on_root(&self.comm)?;
        let (Some(master), Some((opt_state, opt_buffers))) = (master, optimizer) else {
            return Ok(());
        };
        let mut rng = BTreeMap::new();
        rng.insert("init".to_string(), Rng::new(self.cfg.seed).state());
        let settings = serde_json::to_value(&self.cfg)?;
        let data_position = serde_json::to_value(self.loader.position())?;
        let extra = json!({
            "tokens": self.tokens,
            "best_val_loss": self.best_val,
            "early_stopping": self.early,
        });
        let c = self.model.config();
        // model.safetensors holds exactly the vocabulary's rows, next to a config.json, so
        // Hugging Face's GPT2LMHeadModel loads the step directory as it is.
        let export = hf::export_layout(self.zero.layout(), c.vocab_size)?;
        let hf_shape = hf::Gpt2Shape {
            vocab_size: c.vocab_size,
            n_positions: c.block_size,
            n_embd: c.n_embd,
            n_layer: c.n_layer,
            n_head: c.n_head,
        };
        let hf_config = serde_json::to_vec_pretty(&hf::gpt2_config(&hf_shape, self.data.eos))?;
        let req = SaveRequest {
            step: self.step,
            layout: &export,
            master: &master,
            model_config: &self.model_config_json(),
            optimizer: OptimizerSnapshot {
                state: opt_state,
                buffers: opt_buffers
                    .iter()
                    .map(|(n, b)| (n.to_string(), &b[..]))
                    .collect(),
            },
            scaler: &self.scaler,
            rng: &rng,
            data_position: &data_position,
            settings: &settings,
            extra: &extra,
            files: vec![(hf::HF_CONFIG_FILE.to_string(), hf_config)],
        };
        let path =
            save(dir, &req).with_context(|| format!("saving a checkpoint in {}", dir.display()))?;
        self.saved_step = Some(self.step);
        if std::mem::take(&mut self.overwrite_pending) {
            // --overwrite: the other run's checkpoints go once this run has one of its own.
            remove_all_but(dir, &path).context("--overwrite")?;
        }
        if let Some(k) = NonZeroUsize::new(self.cfg.keep_last) {
            // Keep the newest of this run's own timeline: after resuming from an older step,
            // later checkpoints in DIR are an abandoned timeline, not newer work.
            prune_run(dir, k, self.step)?;
        }
        eprintln!("saved {}", path.display());
        Ok(())
    }

    /// Restores everything from the latest complete checkpoint under `dir` (every rank reads
    /// the full state and keeps its shard).
    pub(super) fn resume_from(&mut self, dir: &Path) -> Result<()> {
        let r =
            CheckpointReader::open(dir).with_context(|| format!("--resume {}", dir.display()))?;
        let st = r.state();
        let now = serde_json::to_value(&self.cfg)?;
        for key in MUST_MATCH {
            let (a, b) = (st.settings.get(*key), now.get(*key));
            // Paths match by what they name, not how they are spelled.
            let same_path = || match (a.and_then(Value::as_str), b.and_then(Value::as_str)) {
                (Some(x), Some(y)) => super::preflight::same_path(Path::new(x), Path::new(y)),
                _ => false,
            };
            if a != b && !(*key == "data" && same_path()) {
                bail!(
                    "--resume {}: the checkpoint was written with {key} = {}, this run has {}",
                    r.path().display(),
                    a.map_or("unset".into(), Value::to_string),
                    b.map_or("unset".into(), Value::to_string)
                );
            }
        }
        let n = self.zero.len();
        let ours = self.zero.optimizer_shard().optimizer().config();
        if st.optimizer.config.kind() != ours.kind() {
            bail!(
                "--resume {}: the checkpoint's optimizer is {}, this run uses {}",
                r.path().display(),
                st.optimizer.config.kind(),
                ours.kind()
            );
        }
        let mut master = vec![0f32; n];
        hf::load_master(
            &r,
            self.zero.layout(),
            self.model.config().vocab_size,
            &mut master,
        )?;
        let mut buffers: Vec<(&str, Vec<f32>)> = self
            .zero
            .state_names()
            .iter()
            .map(|&name| (name, vec![0f32; n]))
            .collect();
        {
            let mut views: Vec<(&str, &mut [f32])> = buffers
                .iter_mut()
                .map(|(name, b)| (*name, b.as_mut_slice()))
                .collect();
            r.load_optimizer_buffers(&mut views)?;
        }
        self.zero
            .restore(&master, &st.optimizer, &buffers)
            .with_context(|| format!("--resume {}", r.path().display()))?;
        drop((master, buffers));
        self.scaler = st.scaler.clone();
        let pos: LoaderPosition = serde_json::from_value(st.data_position.clone())
            .context("the checkpoint's data position")?;
        self.loader = Self::open_loader(
            &self.cfg,
            &self.data,
            self.seq_len,
            self.comm.rank(),
            Some(pos),
        )?;
        self.step = st.step;
        self.tokens = st.extra.get("tokens").and_then(Value::as_u64).unwrap_or(0);
        self.best_val = st.extra.get("best_val_loss").and_then(Value::as_f64);
        if self.early.is_some()
            && let Some(es) = st.extra.get("early_stopping").filter(|v| !v.is_null())
        {
            self.early = Some(serde_json::from_value::<EarlyStopping>(es.clone())?);
        }
        if self.is_root() {
            eprintln!("resumed from {} at step {}", r.path().display(), self.step);
        }
        Ok(())
    }
}
