//! fastsync: the CLI and the core that plans transfers and hands them to an engine (`uring/` or `fallback/`).

pub mod cli;
pub mod copy;
pub mod engines;
pub mod error;
pub mod meta;
pub mod plan;
pub mod progress;
pub mod slab;
pub mod stats;

pub use error::Error;
