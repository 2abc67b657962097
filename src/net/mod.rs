//! LAN transfers between two fastsync processes: the `fastsync://` URL, the wire format, authentication, the
//! server (`fastsync serve`) and the client side of `copy`, `sync` and `list`.

pub mod auth;
pub mod beneath;
pub mod client;
pub mod direct;
pub mod record;
pub mod server;
pub mod shards;
pub mod sparse;
pub mod streams;
pub mod url;
pub mod wire;
pub mod zerocopy;
