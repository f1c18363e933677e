//! The BERT sequence classifier: its parameters, their files, and its layer sequence.

pub mod bert;
pub mod params;
pub mod weights;
