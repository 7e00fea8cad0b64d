//! lathe-trainer: precision, optimizers, schedules, checkpoints, data pipeline, profiler and the
//! `lathe` command line.

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod early_stop;
pub mod launch;
pub mod metrics;
pub mod optim;
pub mod precision;
pub mod profiler;
pub mod report;
pub mod schedule;
pub mod train;
pub mod zero;
