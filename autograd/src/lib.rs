//! lathe-autograd
