//! Typed launches of the memory-bound training kernels.
