//! The pure X.509 core: keys, PEM, certificate profiles, CSR parsing, chain checks and
//! SPIFFE identities.
//!
//! Nothing in this module reads the clock, the filesystem or the network: the current time is
//! always an argument, and the only side effect is drawing randomness for keys and serials.

pub mod cert;
pub mod chain;
pub mod csr;
pub mod inspect;
pub mod key;
pub mod leaf;
pub mod pem;
pub mod spiffe;
pub mod template;

/// Errors of the PKI core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Text that should hold PEM blocks could not be parsed.
    #[error("malformed PEM: {0}")]
    Pem(String),
    /// A PEM file held no block of the expected kind.
    #[error("no {expected} PEM block found")]
    MissingBlock {
        /// What was looked for, e.g. `CERTIFICATE`.
        expected: &'static str,
    },
    /// A certificate could not be decoded.
    #[error("malformed certificate: {0}")]
    Certificate(String),
    /// A CSR could not be decoded.
    #[error("malformed CSR: {0}")]
    Csr(String),
    /// The CSR's self-signature does not verify.
    #[error("CSR signature does not verify")]
    CsrSignature,
    /// A key too weak to accept.
    #[error("weak key: {0} (RSA keys need at least 2048 bits)")]
    WeakKey(String),
    /// A private key could not be decoded or is of an unsupported kind.
    #[error("unsupported or malformed private key: {0}")]
    Key(String),
    /// A key or algorithm is not supported.
    #[error("unsupported key algorithm: {0}")]
    UnsupportedAlgorithm(String),
    /// The private key does not belong to the certificate.
    #[error("private key does not match the certificate's public key")]
    KeyMismatch,
    /// Certificate generation failed inside the X.509 encoder.
    #[error("certificate generation failed: {0}")]
    Generate(String),
    /// A SPIFFE identity is malformed.
    #[error("invalid SPIFFE ID {id:?}: {reason}")]
    Spiffe {
        /// The offending text.
        id: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A certificate chain does not validate.
    #[error("chain does not validate: {0}")]
    Chain(String),
    /// The system random number generator failed.
    #[error("random number generator failed")]
    Random,
}

impl From<rcgen::Error> for Error {
    fn from(e: rcgen::Error) -> Self {
        Self::Generate(e.to_string())
    }
}
