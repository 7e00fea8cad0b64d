//! Shared helpers for Lathe's criterion benchmarks.
