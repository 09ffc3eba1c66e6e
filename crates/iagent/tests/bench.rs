//! `iagent bench` against a real gateway (the binary) and against an in-test echo server
//! standing in for the reference: every mode runs end to end and reports what it promises.
//! These check structure and counts only; how fast anything is shows in the numbers
//! `bench/run` prints, never in a test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Output, Stdio};

mod common;

use common::{BIN, Lines};

/// A gateway on a fresh data directory: the child, its URL and its token.
fn gateway(data: &std::path::Path) -> (Child, String, String) {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .env("IAGENT_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("serve starts");
    let mut out = Lines::of(child.stdout.take().unwrap());
    let mut err = Lines::of(child.stderr.take().unwrap());
    let command = out.wait_for(" send ");
    err.wait_for("serving");
    let words: Vec<&str> = command.split_whitespace().collect();
    let url = words[words.iter().position(|w| *w == "--url").unwrap() + 1];
    let token = words.iter().find(|w| w.starts_with("iat_")).unwrap();
    (child, url.to_owned(), (*token).to_owned())
}

/// Runs `iagent bench` with `args` and `--json`; the output and the JSON it wrote.
fn bench(args: &[&str]) -> (Output, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let output = Command::new(BIN)
        .arg("bench")
        .args(args)
        .arg("--json")
        .arg(&json)
        .env_remove("IAGENT_TOKEN")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let results = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    (output, results)
}

/// An echo server like `bench/reference-echo`: every text or binary frame back unchanged.
fn echo_server() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let Ok(mut socket) = tokio_tungstenite::tungstenite::accept(stream) else {
                    return;
                };
                while let Ok(frame) = socket.read() {
                    if (frame.is_text() || frame.is_binary()) && socket.send(frame).is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("ws://{address}")
}

fn stop(mut child: Child) {
    child.kill().ok();
    child.wait().ok();
}

#[test]
fn the_open_loop_sends_every_scheduled_message_and_measures_each_one() {
    let dir = tempfile::tempdir().unwrap();
    let (child, url, token) = gateway(dir.path());
    let pid = child.id().to_string();
    let (output, results) = bench(&[
        "--url",
        &url,
        "--token",
        &token,
        "--connections",
        "2",
        "--users",
        "50",
        "--rate",
        "400",
        "--duration",
        "0.5",
        "--warmup",
        "0.25",
        "--group-share",
        "0.5",
        "--server-pid",
        &pid,
    ]);
    stop(child);
    assert_eq!(results["loop"], "open", "{results}");
    assert_eq!(results["rate"], 400.0);
    // 0.5 s at 400/s: exactly the messages the schedule put in the measured window, each
    // answered, half of them group messages (the share is exact, not approximate).
    assert_eq!(results["sent"], 200);
    assert_eq!(results["round_trips"], 200);
    assert_eq!(results["group_round_trips"], 100);
    assert_eq!(results["errors"]["not_ok"], 0);
    assert_eq!(results["errors"]["unanswered"], 0);
    assert!(results["window"].is_null(), "no window in an open loop");
    for field in ["latency_ms", "send_lag_ms"] {
        for p in ["p50", "p99", "p999", "max"] {
            assert!(results[field][p].as_f64().is_some(), "{field}.{p}");
        }
    }
    let cpu = results["server_cpu_seconds_per_100k"].as_f64().unwrap();
    let in_kernel = results["server_system_cpu_seconds_per_100k"]
        .as_f64()
        .unwrap();
    assert!((0.0..=cpu).contains(&in_kernel), "{in_kernel} of {cpu}");
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("of it in the kernel"), "{text}");
    assert!(text.contains("open loop at 400/s"), "{text}");
    assert!(text.contains("send lag:"), "{text}");
}

#[test]
fn memory_is_reported_per_idle_connection_and_per_conversation() {
    let dir = tempfile::tempdir().unwrap();
    let (child, url, token) = gateway(dir.path());
    let pid = child.id().to_string();
    let (output, results) = bench(&[
        "--url",
        &url,
        "--token",
        &token,
        "--connections",
        "2",
        "--memory",
        "20",
        "--server-pid",
        &pid,
    ]);
    stop(child);
    let memory = &results["memory"];
    assert_eq!(memory["idle_connections"], 20, "{results}");
    assert_eq!(memory["conversations"], 20);
    let rss = &memory["rss_kib"];
    for step in [
        "baseline",
        "idle_connections_open",
        "conversations_warm",
        "conversations_done",
    ] {
        assert!(rss[step].as_u64().unwrap() > 0, "{step}");
    }
    let per_connection =
        (rss["idle_connections_open"].as_f64().unwrap() - rss["baseline"].as_f64().unwrap()) / 20.0;
    assert_eq!(memory["kib_per_idle_connection"], per_connection);
    let per_conversation = (rss["conversations_done"].as_f64().unwrap()
        - rss["conversations_warm"].as_f64().unwrap())
        / 20.0;
    assert_eq!(memory["kib_per_conversation"], per_conversation);
    assert_eq!(memory["errors"]["not_ok"], 0);
    assert_eq!(memory["errors"]["unanswered"], 0);
    assert!(
        results.get("round_trips").is_none(),
        "no load in a memory run"
    );
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("per idle connection:"), "{text}");
}

#[test]
fn the_load_can_go_through_the_client_pool() {
    let dir = tempfile::tempdir().unwrap();
    let (child, url, token) = gateway(dir.path());
    let (_, results) = bench(&[
        "--url",
        &url,
        "--token",
        &token,
        "--via-client",
        "--connections",
        "2",
        "--users",
        "50",
        "--window",
        "4",
        "--duration",
        "0.5",
        "--warmup",
        "0.2",
        "--group-share",
        "0.25",
    ]);
    stop(child);
    assert_eq!(results["driver"], "client", "{results}");
    assert_eq!(results["server"], "gateway");
    assert!(results["round_trips"].as_u64().unwrap() > 0);
    assert!(results["group_round_trips"].as_u64().unwrap() > 0);
    assert_eq!(results["errors"]["not_ok"], 0);
    assert_eq!(results["errors"]["unanswered"], 0);
}

#[test]
fn the_latency_log_has_each_measured_message_at_its_scheduled_time_on_the_wall_clock() {
    let url = echo_server();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("latencies");
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let (_, results) = bench(&[
        "--url",
        &url,
        "--reference",
        "--connections",
        "2",
        "--rate",
        "400",
        "--duration",
        "0.5",
        "--warmup",
        "0.1",
        "--latency-log",
        log.to_str().unwrap(),
    ]);
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<(&str, u128, u128)> = text
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            assert_eq!(fields.len(), 3, "{line}");
            (
                fields[0],
                fields[1].parse().unwrap(),
                fields[2].parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(lines.len() as u64, results["round_trips"].as_u64().unwrap());
    assert_eq!(lines.len(), 200, "0.5 s at 400/s");
    let msg_ids: std::collections::HashSet<&str> = lines.iter().map(|line| line.0).collect();
    assert_eq!(msg_ids.len(), lines.len(), "a msg_id a message");
    let mut scheduled: Vec<u128> = lines.iter().map(|line| line.1).collect();
    scheduled.sort_unstable();
    // On the wall clock, after the run began, and each 2.5 ms after the one before: the
    // schedule's own times, not when the messages happened to be written.
    assert!(scheduled[0] > before, "{} before {before}", scheduled[0]);
    for pair in scheduled.windows(2) {
        assert_eq!(pair[1] - pair[0], 2_500_000);
    }
    for (msg_id, scheduled, read) in &lines {
        assert!(read > scheduled, "{msg_id} read before it was due");
    }
}

#[test]
fn an_echo_server_is_driven_without_a_token_and_matched_by_msg_id() {
    let url = echo_server();
    for pace in [["--window", "8"], ["--rate", "300"]] {
        let (_, results) = bench(&[
            "--url",
            &url,
            "--reference",
            "--connections",
            "2",
            pace[0],
            pace[1],
            "--duration",
            "0.4",
            "--warmup",
            "0.1",
        ]);
        assert_eq!(results["server"], "reference", "{results}");
        assert!(results["round_trips"].as_u64().unwrap() > 0);
        assert_eq!(results["round_trips"], results["sent"]);
        assert_eq!(results["errors"]["not_ok"], 0);
        assert_eq!(results["errors"]["unanswered"], 0);
    }
    // The gateway's replies are matched by ref_msg_id: without --reference a token is needed.
    let refused = Command::new(BIN)
        .args(["bench", "--url", &url, "--duration", "0.1"])
        .env_remove("IAGENT_TOKEN")
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--token"));
}
