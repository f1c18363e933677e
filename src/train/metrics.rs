//! Classification metrics as the Hugging Face examples compute them.
