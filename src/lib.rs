//! cactl: a certificate authority and trust-bundle distributor for multi-cluster Istio meshes.
//!
//! The crate is split into a pure core ([`pki`], [`policy`], [`bundle`], [`cacerts`], [`ca`])
//! that never reads the clock, the filesystem or the network, and edges that do I/O
//! ([`state`], [`backend`], [`cli`]).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod authority;
pub mod backend;
pub mod bench;
pub mod bridge;
pub mod bundle;
pub mod ca;
pub mod cacerts;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod coalesce;
pub mod config;
pub mod devtoken;
pub mod fsutil;
pub mod grpc;
pub mod lease;
pub mod logging;
pub mod pki;
pub mod policy;
pub mod rotation;
pub mod secret;
pub mod serve;
pub mod state;
pub mod telemetry;
pub mod tls;
pub mod trust;
pub mod vault;
