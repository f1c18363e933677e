//! The BERT layer sequence over the backend boundary.
