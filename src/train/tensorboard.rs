//! TensorBoard event files, written by a small writer of our own.
