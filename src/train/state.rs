//! `trainer_state.json` as transformers writes it.
