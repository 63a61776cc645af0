//! Distribution: what every member cluster must hold (`cacerts`, the trust bundle,
//! `istio-ca-root-cert` in every namespace for external clusters, optionally `istiod-tls` and a
//! ClusterTrustBundle), how what it holds compares (a pure function), and pushing the
//! difference with optimistic concurrency.
//!
//! Every object cactl writes carries the label `app.kubernetes.io/managed-by: cactl` and two
//! annotations: the SHA-256 of the content cactl manages in it and the state revision it came
//! from. An object whose hash already matches is never written; an object cactl did not create
//! is never overwritten unless adoption is asked for; keys and labels cactl does not manage are
//! left untouched.

pub mod desired;
pub mod distribute;
pub mod push;
