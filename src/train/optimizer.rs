//! AdamW over the flat parameter buffer, with the Trainer's parameter groups.
