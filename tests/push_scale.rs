//! Scale benchmark for distribution (not a timed test; run it on purpose):
//!
//! ```text
//! cargo test --release --test push_scale -- --ignored --nocapture
//! ```
//!
//! 50 stand-in clusters in external mode with 200 namespaces each and 20 ms of injected latency
//! per request: time for a full initial push, time for a no-op push, and requests per cluster.

mod common;

use std::sync::atomic::Ordering;
use std::time::Instant;

use common::Env;
use common::kube_standin::StandIn;

#[test]
#[ignore = "benchmark: cargo test --release --test push_scale -- --ignored --nocapture"]
fn fifty_clusters_two_hundred_namespaces_twenty_ms() {
    const CLUSTERS: usize = 50;
    const NAMESPACES: usize = 200;
    let env = Env::new();
    let mut yaml = String::from("clusters:\n");
    let mut standins = Vec::new();
    for i in 0..CLUSTERS {
        let s = StandIn::start(&format!("c{i:02}"));
        s.add_namespace("istio-system");
        for n in 0..NAMESPACES - 1 {
            s.add_namespace(&format!("ns-{n:03}"));
        }
        s.kubeconfig(&env.path(&format!("kube/c{i:02}.yaml")));
        yaml.push_str(&format!(
            "- name: c{i:02}\n  kubeconfig: kube/c{i:02}.yaml\n  mode: external\n"
        ));
        standins.push(s);
    }
    env.write("cactl.yaml", yaml);
    env.ok(&["init"]);
    for s in &standins {
        s.faults.latency_ms.store(20, Ordering::SeqCst);
    }
    let totals = |f: &dyn Fn(&StandIn) -> u64| standins.iter().map(f).collect::<Vec<u64>>();
    let t0 = totals(&|s| s.counters.total.load(Ordering::SeqCst));
    let start = Instant::now();
    env.ok(&["push"]);
    let full = start.elapsed();
    let t1 = totals(&|s| s.counters.total.load(Ordering::SeqCst));
    let w1 = totals(&|s| s.writes());
    for s in &standins {
        assert_eq!(
            s.get("configmaps", "ns-198", "istio-ca-root-cert")
                .map(|_| ()),
            Some(())
        );
    }
    let start = Instant::now();
    env.ok(&["push"]);
    let noop = start.elapsed();
    let t2 = totals(&|s| s.counters.total.load(Ordering::SeqCst));
    let w2 = totals(&|s| s.writes());
    let per = |a: &[u64], b: &[u64]| {
        let d: Vec<u64> = a.iter().zip(b).map(|(x, y)| y - x).collect();
        (
            d.iter().min().copied().unwrap_or(0),
            d.iter().max().copied().unwrap_or(0),
        )
    };
    let (full_min, full_max) = per(&t0, &t1);
    let (noop_min, noop_max) = per(&t1, &t2);
    let noop_writes: u64 = w1.iter().zip(&w2).map(|(a, b)| b - a).sum();
    println!(
        "clusters {CLUSTERS}, namespaces per cluster {NAMESPACES}, injected latency 20 ms per request"
    );
    println!(
        "full initial push: {:.1} s, requests per cluster {full_min}..{full_max} (writes {})",
        full.as_secs_f64(),
        w1.iter().sum::<u64>()
    );
    println!(
        "no-op push:        {:.1} s, requests per cluster {noop_min}..{noop_max}, writes {noop_writes}",
        noop.as_secs_f64()
    );
    assert_eq!(noop_writes, 0, "a no-op push must not write");
    assert!(full.as_secs() < 60, "full push took {full:?}");
}
