//! cactl: a certificate authority and trust-bundle distributor for multi-cluster Istio meshes.
//!
//! The crate is split into a pure core ([`pki`], [`policy`], [`bundle`], [`cacerts`], [`ca`])
//! that never reads the clock, the filesystem or the network, and edges that do I/O
//! ([`state`], [`backend`], [`cli`]).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod backend;
pub mod bundle;
pub mod ca;
pub mod cacerts;
pub mod cli;
pub mod config;
pub mod fsutil;
pub mod pki;
pub mod policy;
pub mod secret;
pub mod state;
