//! What commands print, in text or JSON.

use std::path::Path;

use anyhow::Result;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::OutputFormat;
use crate::ca::Issued;
use crate::cacerts::Check;
use crate::config::Loaded;
use crate::pki::cert::CertInfo;
use crate::policy::Approved;
use crate::state::{IntermediateRecord, RootRecord, State};

fn ts(t: OffsetDateTime) -> String {
    let t = t.replace_nanosecond(0).unwrap_or(t);
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

pub(super) fn message(format: OutputFormat, text: &str, json: Value) {
    match format {
        OutputFormat::Text => outln!("{text}"),
        OutputFormat::Json => outln!("{json}"),
    }
}

pub(super) fn init(
    format: OutputFormat,
    wrote_config: Option<&Path>,
    store: &str,
    root: &RootRecord,
    info: &CertInfo,
) {
    match format {
        OutputFormat::Text => {
            if let Some(p) = wrote_config {
                outln!("wrote starter config {}", p.display());
            }
            outln!(
                "root {} ({:?}): {}\n  serial {}\n  not after {}\n  sha256 {}\nstate in {store}",
                root.id,
                root.origin,
                info.subject,
                info.serial_hex,
                ts(info.not_after),
                info.sha256
            );
        }
        OutputFormat::Json => outln!(
            "{}",
            json!({
                "config_written": wrote_config,
                "state": store,
                "root": {
                    "id": root.id, "origin": root.origin, "subject": info.subject,
                    "serial": info.serial_hex, "not_after": ts(info.not_after), "sha256": info.sha256,
                }
            })
        ),
    }
}

pub(super) fn issued(
    format: OutputFormat,
    cluster: &str,
    r: &IntermediateRecord,
    now: OffsetDateTime,
) {
    let days = (r.not_after - now).whole_days();
    match format {
        OutputFormat::Text => outln!(
            "cluster {cluster}: new intermediate serial {} signed by {}, not after {} ({days} days)",
            r.serial,
            r.root_id,
            ts(r.not_after)
        ),
        OutputFormat::Json => outln!(
            "{}",
            json!({"cluster": cluster, "serial": r.serial, "root": r.root_id,
                   "not_after": ts(r.not_after), "days_left": days})
        ),
    }
}

pub(super) fn signed(
    format: OutputFormat,
    cluster: &str,
    approved: &Approved,
    leaf: &CertInfo,
    issued: &Issued,
    chain_to_stdout: bool,
) {
    match format {
        OutputFormat::Text => {
            if chain_to_stdout {
                out!("{}", issued.chain_pem());
            } else {
                outln!(
                    "signed {} for {} with {cluster}'s intermediate, not after {}{}",
                    leaf.serial_hex,
                    approved.identity,
                    ts(leaf.not_after),
                    if approved.ttl_clamped {
                        " (TTL clamped to the maximum)"
                    } else {
                        ""
                    }
                );
            }
        }
        OutputFormat::Json => outln!(
            "{}",
            json!({
                "cluster": cluster,
                "identity": approved.identity.to_string(),
                "serial": leaf.serial_hex,
                "not_before": ts(leaf.not_before),
                "not_after": ts(leaf.not_after),
                "ttl_clamped": approved.ttl_clamped,
                "cert_chain": issued.istio_cert_chain(),
            })
        ),
    }
}

pub(super) fn checks(format: OutputFormat, dir: &Path, checks: &[Check]) {
    let ok = checks.iter().all(|c| c.ok);
    match format {
        OutputFormat::Text => {
            for c in checks {
                outln!(
                    "{} {}: {}",
                    if c.ok { "PASS" } else { "FAIL" },
                    c.name,
                    c.detail
                );
            }
            outln!(
                "verdict: {} ({})",
                if ok {
                    "istiod would load these cacerts"
                } else {
                    "istiod would NOT load these cacerts"
                },
                dir.display()
            );
        }
        OutputFormat::Json => outln!("{}", json!({"dir": dir, "ok": ok, "checks": checks})),
    }
}

pub(super) fn status(
    format: OutputFormat,
    loaded: &Loaded,
    state: &State,
    now: OffsetDateTime,
    observed: &[crate::trust::push::ClusterReport],
    last: &crate::trust::distribute::PushStatus,
    rotation: Value,
) -> Result<()> {
    use crate::trust::desired::Sync as S;
    let mut roots = Vec::new();
    for r in &state.roots {
        let info = CertInfo::from_pem_first(&r.cert_pem)?;
        roots.push(json!({
            "id": r.id, "status": r.status, "origin": r.origin, "subject": info.subject,
            "serial": info.serial_hex, "not_after": ts(info.not_after),
            "days_left": info.days_left(now), "key_in_state": r.key_pem.is_some(),
            "backend_ref": r.backend_ref, "retired_at": r.retired_at.map(ts),
        }));
    }
    let mut clusters = Vec::new();
    for c in &loaded.config.clusters {
        let cs = state.clusters.get(&c.name);
        let current = cs.and_then(|s| s.current.as_ref()).map(|r| {
            json!({
                "serial": r.serial, "root": r.root_id, "created_at": ts(r.created_at),
                "not_after": ts(r.not_after), "days_left": (r.not_after - now).whole_days(),
            })
        });
        let sync = observed.iter().find(|r| r.cluster == c.name).map(|r| {
            let count = |f: &dyn Fn(&S) -> bool| r.objects.iter().filter(|o| f(&o.before)).count();
            let drifted: Vec<&str> = r
                .objects
                .iter()
                .filter(|o| !matches!(o.before, S::InSync))
                .map(|o| o.object.as_str())
                .collect();
            json!({
                "reachable": r.reachable,
                "error": r.error,
                "objects": r.objects.len(),
                "in_sync": count(&|s| matches!(s, S::InSync)),
                "drifted": count(&|s| matches!(s, S::Drifted { .. })),
                "missing": count(&|s| matches!(s, S::Missing)),
                "not_ours": count(&|s| matches!(s, S::NotOurs)),
                "out_of_sync": drifted,
                "istiod_has_bundle": r.istiod_has_bundle,
            })
        });
        let last_push = last
            .clusters
            .get(&c.name)
            .map(|l| json!({"at": ts(l.at), "ok": l.ok, "summary": l.summary, "error": l.error}));
        clusters.push(json!({
            "name": c.name,
            "mode": c.mode,
            "intermediate": current,
            "history": cs.map_or(0, |s| s.history.len()),
            "sync": sync,
            "last_push": last_push,
        }));
    }
    let doc = json!({
        "trust_domain": loaded.config.trust_domain,
        "state_revision": state.revision,
        "evaluated_at": ts(now),
        "roots": roots,
        "clusters": clusters,
        "rotation": rotation,
    });
    match format {
        OutputFormat::Json => outln!("{doc}"),
        OutputFormat::Text => {
            outln!(
                "trust domain {}  (state revision {})",
                loaded.config.trust_domain,
                state.revision
            );
            outln!("roots:");
            for r in &roots {
                outln!(
                    "  {:<8} {:<8} serial {}  not after {}  ({} days left)",
                    r["id"].as_str().unwrap_or("?"),
                    r["status"].as_str().unwrap_or("?"),
                    r["serial"].as_str().unwrap_or("?"),
                    r["not_after"].as_str().unwrap_or("?"),
                    r["days_left"]
                );
            }
            outln!("clusters:");
            if clusters.is_empty() {
                outln!("  (none; add one with `cactl cluster add NAME`)");
            }
            for c in &clusters {
                let name = c["name"].as_str().unwrap_or("?");
                match c["intermediate"].as_object() {
                    None => outln!("  {name:<16} no intermediate (run `cactl issue {name}`)"),
                    Some(i) => outln!(
                        "  {name:<16} serial {}  root {}  not after {}  ({} days left)",
                        i["serial"].as_str().unwrap_or("?"),
                        i["root"].as_str().unwrap_or("?"),
                        i["not_after"].as_str().unwrap_or("?"),
                        i["days_left"]
                    ),
                }
                if let Some(sy) = c["sync"].as_object() {
                    if let Some(e) = sy["error"].as_str() {
                        outln!("  {:<16} sync: UNREACHABLE or failing: {e}", "");
                    } else if sy["in_sync"] == sy["objects"] {
                        outln!("  {:<16} sync: in sync ({} objects)", "", sy["objects"]);
                    } else {
                        outln!(
                            "  {:<16} sync: OUT OF SYNC: {} drifted, {} missing, {} not ours: {}",
                            "",
                            sy["drifted"],
                            sy["missing"],
                            sy["not_ours"],
                            sy["out_of_sync"]
                        );
                    }
                    match sy["istiod_has_bundle"].as_bool() {
                        Some(true) => {
                            outln!("  {:<16} istiod: istio-ca-root-cert holds the bundle", "")
                        }
                        Some(false) => outln!(
                            "  {:<16} istiod: istio-ca-root-cert does not hold the bundle yet",
                            ""
                        ),
                        None => {}
                    }
                }
                if let Some(lp) = c["last_push"].as_object() {
                    outln!(
                        "  {:<16} last push: {} {}",
                        "",
                        lp["at"].as_str().unwrap_or("?"),
                        if lp["ok"] == true { "ok" } else { "FAILED" }
                    );
                }
            }
            outln!("rotation:");
            rotation_text(&doc["rotation"]);
        }
    }
    Ok(())
}

pub(super) fn serving(format: OutputFormat, bound: &crate::serve::Bound) {
    match format {
        OutputFormat::Text => {
            outln!(
                "serving IstioCertificateService on {} (TLS, serving cert {}); metrics and health on http://{}",
                bound.grpc,
                bound.serving_serial,
                bound.metrics
            );
            if let Some(p) = bound.plaintext {
                outln!("plaintext h2c listener (tests only) on {p}");
            }
        }
        OutputFormat::Json => outln!("{}", json!({"event": "listening", "bound": bound})),
    }
}

pub(super) fn requested(format: OutputFormat, chain: &[String]) {
    match format {
        OutputFormat::Text => {
            if let Some(leaf) = chain.first()
                && let Ok(info) = CertInfo::from_pem_first(leaf)
            {
                outln!(
                    "got {} element(s): leaf serial {} for {} not after {}",
                    chain.len(),
                    info.serial_hex,
                    info.uris.join(","),
                    ts(info.not_after)
                );
            }
        }
        OutputFormat::Json => outln!("{}", json!({"cert_chain": chain})),
    }
}

pub(super) fn bench(format: OutputFormat, r: &crate::bench::Report) {
    match format {
        OutputFormat::Json => outln!("{}", json!(r)),
        OutputFormat::Text => {
            let raw = |label: &str, c: &crate::bench::RawCost| {
                outln!(
                    "raw crypto (ring) {label}: 1 thread: P-256 verify {:.1} us, P-256 sign {:.1} us, RSA-2048 verify {:.1} us -> {:.0} certs/s (P-256 CSRs), {:.0} (RSA CSRs); {} threads at once: {:.0} certs/s (P-256 CSRs, {:.2} of {} x one)",
                    c.verify_us,
                    c.sign_us,
                    c.rsa_verify_us,
                    c.limit_per_core,
                    c.limit_per_core_rsa_csr,
                    c.threads,
                    c.limit_all_cores,
                    c.limit_all_cores / (c.limit_per_core * c.threads as f64),
                    c.threads
                );
            };
            raw("before", &r.raw);
            raw("after", &r.raw_after);
            outln!(
                "cores {}, mix {:?}, verify_issued {}, server nice {:?}, server log {}",
                r.cores,
                r.styles,
                r.verify_issued,
                r.server_nice,
                r.server_log
            );
            outln!(
                "{:>5} {:>8} {:>6} {:>7} {:>7} {:>7} {:>8} {:>8} {:>6} {:>7} {:>7} {:>7} {:>8}",
                "conc",
                "certs/s",
                "errors",
                "p50 ms",
                "p99 ms",
                "p999 ms",
                "srv us",
                "limit/s",
                "ratio",
                "ratio1x",
                "CPU/raw",
                "loaded",
                "RSS KiB"
            );
            for l in &r.levels {
                outln!(
                    "{:>5} {:>8.0} {:>6} {:>7.2} {:>7.2} {:>7.2} {:>8.1} {:>8.0} {:>6.3} {:>7.3} {:>7.2} {:>7.2} {:>8}",
                    l.concurrency,
                    l.throughput,
                    l.errors,
                    l.p50_ms,
                    l.p99_ms,
                    l.p999_ms,
                    l.server_cpu_us_per_cert,
                    l.limit,
                    l.ratio_to_limit,
                    l.ratio_to_cores_times_one,
                    l.cpu_over_raw,
                    l.cpu_over_raw_loaded,
                    l.server_rss_kib
                );
                let conns: Vec<String> = l
                    .connections
                    .iter()
                    .map(|c| format!("{:.2}/{:.1}", c.p99_ms, c.longest_gap_ms))
                    .collect();
                let workers: Vec<String> = l
                    .workers
                    .iter()
                    .map(|w| format!("{:.0}/{:.0}", w.cpu_ms, w.run_queue_wait_ms))
                    .collect();
                outln!(
                    "      connections p99/longest gap ms: {}; workers CPU/run-queue wait ms: {}",
                    conns.join(" "),
                    workers.join(" ")
                );
            }
            outln!(
                "limit/s: raw crypto on all cores at once (mean of the measurements before and after the level); ratio = certs/s / limit; ratio1x = certs/s / (cores x one thread's limit); CPU/raw = server CPU per cert / one thread's raw cost; loaded = / the raw cost per thread with all cores busy"
            );
        }
    }
}

pub(super) fn push_progress(format: OutputFormat, r: &crate::trust::push::ClusterReport) {
    if format != OutputFormat::Text {
        return;
    }
    match &r.error {
        None => {
            let istiod = match r.istiod_has_bundle {
                Some(true) => ", istiod holds the bundle",
                Some(false) => ", istiod has not picked up the bundle yet",
                None => "",
            };
            outln!(
                "{}: ok, {}, {} write(s), {} ms{istiod}",
                r.cluster,
                r.summary(),
                r.writes,
                r.millis
            );
        }
        Some(e) => outln!("{}: FAILED after {} attempt(s): {e}", r.cluster, r.attempts),
    }
}

pub(super) fn push_done(format: OutputFormat, reports: &[crate::trust::push::ClusterReport]) {
    if format == OutputFormat::Json {
        outln!("{}", json!({"clusters": reports}));
    }
}

/// The rotation view of every cluster: slots, thresholds, what is due and why.
pub(super) fn rotation_doc(
    state: &State,
    config: &crate::config::Config,
    policy: &crate::rotation::Policy,
    at: OffsetDateTime,
    planned: &[crate::rotation::Planned],
    obs: &std::collections::BTreeMap<String, crate::rotation::execute::Observation>,
) -> Value {
    use crate::rotation::{Action, thresholds};
    let names: Vec<String> = config.clusters.iter().map(|c| c.name.clone()).collect();
    let slots = crate::rotation::execute::slots(state, &names);
    let mut clusters = Vec::new();
    for (name, sl) in &slots {
        let due: Vec<Value> = planned
            .iter()
            .filter(|p| match &p.action {
                Action::Prepare { cluster, .. } | Action::Activate { cluster } => cluster == name,
                _ => false,
            })
            .map(|p| json!({"action": p.action, "reason": p.reason}))
            .collect();
        let slot = |s: &crate::rotation::Slot| json!({"serial": s.serial, "root": s.root_id, "not_after": ts(s.not_after)});
        let (prepare_at, activate_at) = sl
            .active
            .as_ref()
            .map(|a| thresholds(a, name, policy))
            .map_or((None, None), |(p, a)| (Some(ts(p)), Some(ts(a))));
        let unreachable_since = state
            .clusters
            .get(name)
            .and_then(|c| c.unreachable_since)
            .map(ts);
        clusters.push(json!({
            "name": name,
            "active": sl.active.as_ref().map(slot),
            "prepared": sl.prepared.as_ref().map(slot),
            "prepare_at": prepare_at,
            "activate_at": activate_at,
            "observed": obs.get(name),
            "unreachable_since": unreachable_since,
            "due": due,
        }));
    }
    let rr = &state.root_rotation;
    let root_due: Vec<Value> = planned
        .iter()
        .filter(|p| {
            matches!(
                p.action,
                Action::AdvanceRoot { .. } | Action::Settle | Action::Blocked { .. }
            )
        })
        .map(|p| json!({"action": p.action, "reason": p.reason}))
        .collect();
    json!({
        "evaluated_at": ts(at),
        "root_rotation": {
            "phase": rr.phase.name(),
            "old": rr.phase.roots().map(|r| r.0.to_owned()),
            "new": rr.phase.roots().map(|r| r.1.to_owned()),
            "since": rr.phase.roots().map(|r| ts(r.2)),
            "cross_sign": rr.cross_sign,
            "aborted": rr.aborted,
            "soak": humantime::format_duration(std::time::Duration::from_secs(policy.soak.whole_seconds().max(0) as u64)).to_string(),
            "due": root_due,
        },
        "clusters": clusters,
    })
}

fn rotation_text(doc: &Value) {
    let lr = &doc["last_run"];
    if let Some(at) = lr["at"].as_str() {
        if lr["ok"] == true {
            outln!(
                "last rotation run: {at} by {}: ok",
                lr["by"].as_str().unwrap_or("?")
            );
        } else {
            outln!(
                "last rotation run: {at} by {}: FAILED ({} in a row): {}{}",
                lr["by"].as_str().unwrap_or("?"),
                lr["failures"],
                lr["error"].as_str().unwrap_or("?"),
                lr["next_attempt"]
                    .as_str()
                    .map(|t| format!("; next attempt {t}"))
                    .unwrap_or_default()
            );
        }
    }
    let rr = &doc["root_rotation"];
    match rr["phase"].as_str() {
        Some("stable") | None => outln!("root rotation: none in progress"),
        Some(p) => outln!(
            "root rotation: phase {p} since {} ({} -> {}{}{})",
            rr["since"].as_str().unwrap_or("?"),
            rr["old"].as_str().unwrap_or("?"),
            rr["new"].as_str().unwrap_or("?"),
            if rr["cross_sign"] == true {
                ", cross-signed"
            } else {
                ""
            },
            if rr["aborted"] == true {
                ", ABORTED: moving back"
            } else {
                ""
            },
        ),
    }
    for d in rr["due"].as_array().into_iter().flatten() {
        match d["action"]["action"].as_str() {
            Some("settle") => outln!(
                "  due: start the soak ({})",
                d["reason"].as_str().unwrap_or("?")
            ),
            Some("blocked") => outln!(
                "  HELD: {} ({})",
                d["action"]["reason"].as_str().unwrap_or("?"),
                d["reason"].as_str().unwrap_or("?")
            ),
            _ => outln!(
                "  due: advance to {} ({})",
                d["action"]["to"].as_str().unwrap_or("?"),
                d["reason"].as_str().unwrap_or("?")
            ),
        }
    }
    for c in doc["clusters"].as_array().into_iter().flatten() {
        let name = c["name"].as_str().unwrap_or("?");
        match c["active"].as_object() {
            Some(a) => outln!(
                "  {name:<16} active {} (root {}, not after {}); prepare at {}, activate at {}",
                a["serial"].as_str().unwrap_or("?"),
                a["root"].as_str().unwrap_or("?"),
                a["not_after"].as_str().unwrap_or("?"),
                c["prepare_at"].as_str().unwrap_or("?"),
                c["activate_at"].as_str().unwrap_or("?"),
            ),
            None => outln!("  {name:<16} no active intermediate"),
        }
        if let Some(p) = c["prepared"].as_object() {
            outln!(
                "  {:<16} prepared {} (root {})",
                "",
                p["serial"].as_str().unwrap_or("?"),
                p["root"].as_str().unwrap_or("?")
            );
        }
        if let Some(t) = c["unreachable_since"].as_str() {
            outln!("  {:<16} UNREACHABLE since {t}", "");
        } else if let Some(o) = c["observed"].as_object()
            && o["in_sync"] != true
        {
            outln!(
                "  {:<16} not in sync: {}",
                "",
                o["detail"].as_str().unwrap_or("?")
            );
        }
        let due = c["due"].as_array().map(Vec::len).unwrap_or(0);
        if due == 0 {
            outln!("  {:<16} nothing due", "");
        }
        for d in c["due"].as_array().into_iter().flatten() {
            outln!(
                "  {:<16} due: {} ({})",
                "",
                d["action"]["action"].as_str().unwrap_or("?"),
                d["reason"].as_str().unwrap_or("?")
            );
        }
    }
}

pub(super) fn rotate_plan(format: OutputFormat, doc: &Value, at: OffsetDateTime) {
    match format {
        OutputFormat::Json => outln!("{doc}"),
        OutputFormat::Text => {
            outln!("rotation plan at {} (nothing is changed)", ts(at));
            rotation_text(doc);
        }
    }
}

pub(super) fn rotate_step(format: OutputFormat, step: &crate::rotation::execute::Step) {
    use crate::rotation::execute::Step;
    if format == OutputFormat::Json {
        // The final report lists every step.
        return;
    }
    let line = match step {
        Step::Prepared {
            cluster,
            serial,
            root,
            reason,
        } => format!("{cluster}: prepared intermediate {serial} under {root} ({reason})"),
        Step::Activated {
            cluster,
            serial,
            reason,
        } => format!("{cluster}: activated intermediate {serial} ({reason})"),
        Step::Replaced {
            cluster,
            serial,
            replaced,
        } => format!(
            "{cluster}: EMERGENCY replacement: intermediate {serial} replaces {}",
            replaced.as_deref().unwrap_or("nothing")
        ),
        Step::RootStarted {
            old,
            new,
            cross_sign,
        } => format!(
            "root rotation started: {old} -> {new}{}; phase publish",
            if *cross_sign { " (cross-signed)" } else { "" }
        ),
        Step::PhaseEntered { phase } => format!("root rotation: entered phase {phase}"),
        Step::Settled { phase } => {
            format!("root rotation: every cluster holds phase {phase}'s material; soak started")
        }
        Step::Aborted { phase } => {
            format!("root rotation aborted: now in phase {phase}, moving back")
        }
        Step::Pushed {
            cluster,
            in_sync,
            detail,
        } => match (in_sync, detail) {
            (true, _) => format!("{cluster}: pushed and read back in sync"),
            (false, d) => format!(
                "{cluster}: pushed, NOT in sync: {}",
                d.as_deref().unwrap_or("?")
            ),
        },
    };
    eprintln!("{line}");
}

pub(super) fn rotate_done(format: OutputFormat, report: &crate::rotation::execute::Report) {
    match format {
        OutputFormat::Json => outln!("{}", json!(report)),
        OutputFormat::Text => {
            let changes = report
                .steps
                .iter()
                .filter(|s| !matches!(s, crate::rotation::execute::Step::Pushed { .. }))
                .count();
            outln!(
                "rotation: {changes} change(s), root phase {}, state revision {}",
                report.phase.name(),
                report.revision
            );
            for h in &report.held {
                outln!("  HELD: {h}");
            }
        }
    }
}
