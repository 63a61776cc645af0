//! CSR and PEM parsing plus the workload policy, on arbitrary input: nothing may panic, and
//! anything accepted must be exactly one SPIFFE identity of the trust domain.
#![no_main]

use cactl::pki::{cert::CertInfo, csr, pem};
use cactl::policy::WorkloadPolicy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let policy = WorkloadPolicy {
        trust_domain: "cluster.local".into(),
        default_ttl: time::Duration::hours(24),
        max_ttl: time::Duration::hours(48),
    };
    // As DER.
    if let Ok(parsed) = csr::parse_and_verify(data) {
        check(&policy, &parsed);
    }
    let _ = CertInfo::from_der(data);
    // As PEM text.
    let text = String::from_utf8_lossy(data);
    if let Ok(parsed) = csr::parse_pem_and_verify(&text) {
        check(&policy, &parsed);
    }
    let _ = pem::certificates(&text);
    let _ = cactl::pki::spiffe::SpiffeId::parse(&text);
    let _ = cactl::pki::inspect::describe_pem(&text, time::OffsetDateTime::UNIX_EPOCH);
});

fn check(policy: &WorkloadPolicy, parsed: &csr::ParsedCsr) {
    if let Ok(ok) = policy.evaluate(parsed, Some(time::Duration::seconds(3600)), None) {
        assert_eq!(ok.identity.trust_domain(), "cluster.local");
        assert_eq!(parsed.uris.len(), 1);
        assert!(parsed.dns.is_empty() && parsed.ips.is_empty() && parsed.emails.is_empty());
        assert!(ok.ttl <= policy.max_ttl);
    }
}
