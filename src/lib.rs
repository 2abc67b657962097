//! fastsync: the CLI and the core that plans transfers and hands them to an engine (`uring/` or `fallback/`).

pub mod bench;
pub mod cli;
pub mod config;
pub mod copy;
pub mod engines;
pub mod error;
pub mod filter;
pub mod interrupt;
pub mod list;
pub mod meta;
pub mod net;
pub mod plan;
pub mod progress;
pub mod remote;
pub mod scan;
pub mod slab;
pub mod stale;
pub mod stats;
pub mod sync;

pub use error::Error;
