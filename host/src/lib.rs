//! lathe-host: the GPU runtime over cudarc's driver API.

pub mod comm;
