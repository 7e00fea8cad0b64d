//! early_stop
