//! Tokenization: `tokenizer.json` through the tokenizers crate, or BERT WordPiece from `vocab.txt`.
