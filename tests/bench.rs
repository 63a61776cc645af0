//! `cactl bench` end to end: it starts a real server, drives it over TLS + HTTP/2 with both
//! client styles, and reports what it measured. Short levels: this checks the harness, not the
//! figures (those are in BENCHMARKS.md, from release builds).

use std::process::Command;

#[test]
fn bench_drives_a_real_server_without_errors() {
    let report = bench_report(&[
        "--concurrency",
        "1,8",
        "--duration",
        "1s",
        "--warmup",
        "200ms",
        "--connections",
        "3",
        "--styles",
        "ztunnel,agent",
        "--raw-budget",
        "300ms",
        "--server-nice",
        "3",
    ]);
    assert_eq!(report["styles"], serde_json::json!(["ztunnel", "agent"]));
    assert_eq!(report["server_log"], "info, pipe");
    // Every server thread ran 3 nicer than this test (which runs at nice 0 unless the whole
    // run was started niced).
    let own = own_nice();
    assert_eq!(
        report["server_nice"],
        serde_json::json!([(own + 3).min(19)])
    );
    let levels = report["levels"].as_array().unwrap();
    assert_eq!(levels.len(), 2);
    for (level, conc) in levels.iter().zip([1, 8]) {
        assert_eq!(level["concurrency"], conc);
        assert_eq!(level["errors"], 0, "{level}");
        assert!(level["ok"].as_u64().unwrap() > 0, "{level}");
        assert!(
            level["server_cpu_us_per_cert"].as_f64().unwrap() > 0.0,
            "{level}"
        );
        let throughput = level["throughput"].as_f64().unwrap();
        let limit = level["limit"].as_f64().unwrap();
        assert!(limit > 0.0, "{level}");
        let ratio = level["ratio_to_limit"].as_f64().unwrap();
        assert!((ratio - throughput / limit).abs() < 1e-9, "{level}");
        assert!(
            level["ratio_to_cores_times_one"].as_f64().unwrap() > 0.0,
            "{level}"
        );
        assert!(level["cpu_over_raw"].as_f64().unwrap() > 0.0, "{level}");
        assert!(
            level["cpu_over_raw_loaded"].as_f64().unwrap() > 0.0,
            "{level}"
        );
        assert!(level["p99_ms"].as_f64().unwrap() >= level["p50_ms"].as_f64().unwrap());
        // Each connection's share: they add up to the level, and at one stream only the first
        // connection carries requests.
        let connections = level["connections"].as_array().unwrap();
        assert_eq!(connections.len(), 3, "{level}");
        let shares: Vec<u64> = connections
            .iter()
            .map(|c| c["ok"].as_u64().unwrap())
            .collect();
        assert_eq!(shares.iter().sum::<u64>(), level["ok"].as_u64().unwrap());
        if conc == 1 {
            assert_eq!(&shares[1..], [0, 0], "{level}");
        } else {
            assert!(shares.iter().all(|&n| n > 0), "{level}");
        }
        for c in connections
            .iter()
            .filter(|c| c["ok"].as_u64().unwrap() >= 2)
        {
            assert!(c["p50_ms"].as_f64().unwrap() > 0.0, "{level}");
            assert!(c["p99_ms"].as_f64().unwrap() >= c["p50_ms"].as_f64().unwrap());
            assert!(c["longest_gap_ms"].as_f64().unwrap() > 0.0, "{level}");
        }
        // One entry per signing worker, by thread name; connections are dealt to the workers
        // in turn, so at one stream the first worker does the work.
        let workers = level["workers"].as_array().unwrap();
        assert_eq!(workers.len() as u64, report["cores"].as_u64().unwrap());
        assert_eq!(workers[0]["thread"], "cactl-grpc-0");
        let cpu: Vec<f64> = workers
            .iter()
            .map(|w| w["cpu_ms"].as_f64().unwrap())
            .collect();
        assert!(cpu[0] > 0.0, "{level}");
        if conc == 1 {
            assert!(cpu[0] > cpu[1..].iter().sum::<f64>(), "{level}");
        }
        for w in workers {
            assert!(w["run_queue_wait_ms"].as_f64().unwrap() >= 0.0, "{w}");
        }
    }
    let cores = report["cores"].as_u64().unwrap();
    for raw in [&report["raw"], &report["raw_after"]] {
        assert!(raw["verify_us"].as_f64().unwrap() > 0.0, "{raw}");
        assert!(raw["sign_us"].as_f64().unwrap() > 0.0, "{raw}");
        assert_eq!(raw["threads"].as_u64().unwrap(), cores, "{raw}");
        assert!(raw["limit_all_cores"].as_f64().unwrap() > 0.0, "{raw}");
    }
}

#[test]
fn bench_can_send_the_server_logs_to_dev_null() {
    let report = bench_report(&[
        "--concurrency",
        "2",
        "--duration",
        "500ms",
        "--warmup",
        "100ms",
        "--identities",
        "2",
        "--raw-budget",
        "100ms",
        "--server-log-level",
        "debug",
        "--server-log-sink",
        "null",
    ]);
    assert_eq!(report["server_log"], "debug, null");
    let level = &report["levels"][0];
    assert_eq!(level["errors"], 0, "{level}");
    assert!(level["ok"].as_u64().unwrap() > 0, "{level}");
}

#[test]
fn bench_refuses_an_unknown_log_sink() {
    let out = Command::new(env!("CARGO_BIN_EXE_cactl"))
        .args(["bench", "--server-log-sink", "file"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("invalid value 'file' for '--server-log-sink"),
        "{stderr}"
    );
}

/// Runs `cactl --output json bench ARGS` in an empty directory and returns its report; the run
/// must succeed.
fn bench_report(args: &[&str]) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cactl"))
        .current_dir(dir.path())
        .args(["--output", "json", "bench"])
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {stderr}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// This process's nice value, from `/proc/self/stat`.
fn own_nice() -> i64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let rest = stat.rsplit_once(')').unwrap().1;
    rest.split_whitespace().nth(16).unwrap().parse().unwrap()
}

#[test]
fn bench_names_the_program_it_could_not_start() {
    let dir = tempfile::tempdir().unwrap();
    // No `nice` on an empty PATH: the server cannot be started niced.
    let out = Command::new(env!("CARGO_BIN_EXE_cactl"))
        .current_dir(dir.path())
        .env("PATH", dir.path())
        .args([
            "bench",
            "--concurrency",
            "1",
            "--duration",
            "1s",
            "--identities",
            "1",
            "--raw-budget",
            "100ms",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("bench set-up: start server (nice): No such file or directory"),
        "{stderr}"
    );
}
