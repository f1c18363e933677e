//! The subcommands: each turns its arguments into work for the library and prints the result.

pub mod bench;
pub mod doctor;
pub mod evaluate;
pub mod hub;
pub mod inspect;
pub mod load;
pub mod predict;
pub mod train;
