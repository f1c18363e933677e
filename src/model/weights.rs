//! Loading and saving weights in transformers naming (safetensors).
