//! The `ee` subcommands that need more than a few lines.

pub(crate) mod attack;
pub(crate) mod attack_traffic;
pub(crate) mod bench;
pub(crate) mod bench_encoder;
pub(crate) mod bench_proxy;
pub(crate) mod bench_server;
pub(crate) mod chat;
pub(crate) mod demo;
pub(crate) mod proxy;
pub(crate) mod quantize;
pub(crate) mod text;
