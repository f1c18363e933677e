//! Dataset files (CSV, TSV, JSONL) read into texts and labels.
