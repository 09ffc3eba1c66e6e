//! The binary as a newcomer and an operator use it: the first `serve` creates an app and prints
//! a command that gets a reply, a second start creates nothing, app management prints what it
//! promises and nothing else, and an invalid configuration is refused with every problem named.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

mod common;

use common::{BIN, Lines, WAIT};

fn iagent(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("IAGENT_LOG", "warn")
        .output()
        .expect("iagent runs")
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).expect("UTF-8")
}

fn serve(data: &std::path::Path) -> Child {
    Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .env("IAGENT_LOG", "trace")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("serve starts")
}

/// The gateway's URL and the token in the `send` command a first start prints.
fn url_and_token(command: &str) -> (String, String) {
    let words: Vec<&str> = command.split_whitespace().collect();
    let url = words[words.iter().position(|w| *w == "--url").expect("--url") + 1];
    let token = words
        .iter()
        .find(|w| w.starts_with("iat_"))
        .expect("a token");
    (url.to_owned(), (*token).to_owned())
}

/// A first start of `serve` on `data`, once it serves: the child, its URL and its token.
fn first_start(data: &std::path::Path) -> (Child, String, String) {
    let mut child = serve(data);
    let mut out = Lines::of(child.stdout.take().unwrap());
    let mut err = Lines::of(child.stderr.take().unwrap());
    let command = out.wait_for(" send ");
    err.wait_for("serving");
    // Dropped here, the readers go on draining the child's pipes.
    let (url, token) = url_and_token(&command);
    (child, url, token)
}

/// Sends SIGTERM and waits (bounded) for the process to exit.
fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().expect("wait works") {
            return status;
        }
        if std::time::Instant::now() > deadline {
            child.kill().ok();
            panic!("serve did not exit within {WAIT:?} of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn first_start_prints_a_token_and_a_command_that_gets_a_reply() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = serve(dir.path());
    let mut out = Lines::of(child.stdout.take().unwrap());
    let mut err = Lines::of(child.stderr.take().unwrap());

    let command = out.wait_for(" send ");
    err.wait_for("serving");
    let words: Vec<String> = command
        .split_whitespace()
        .map(|w| w.trim_matches('"').to_owned())
        .collect();
    assert!(words[0].ends_with("iagent"), "{command}");
    let token = words
        .iter()
        .find(|w| w.starts_with("iat_"))
        .expect("the command carries the token")
        .clone();
    let reply = Command::new(BIN)
        .args(&words[1..])
        .output()
        .expect("send runs");
    assert_eq!(
        stdout(&reply).trim(),
        "hello",
        "the printed command gets the echo reply"
    );
    let url = words
        .iter()
        .position(|w| w == "--url")
        .map(|i| words[i + 1].clone())
        .unwrap();
    let refused = iagent(&["send", "--url", &url, "--token", "iat_forged", "hi"]);
    assert!(!refused.status.success());

    assert!(
        terminate(&mut child).success(),
        "SIGTERM is a clean shutdown"
    );
    let logs = err.all();
    assert!(
        logs.iter()
            .any(|line| line.contains("request refused: unknown or revoked app_token")),
        "the refusal is logged"
    );
    for line in &logs {
        assert!(
            !line.contains(&token) && !line.contains("iat_forged"),
            "a token in the logs: {line}"
        );
    }

    // A second start on the same data creates no app and prints no token.
    let mut child = serve(dir.path());
    let out = Lines::of(child.stdout.take().unwrap());
    let mut err = Lines::of(child.stderr.take().unwrap());
    err.wait_for("serving");
    assert!(terminate(&mut child).success());
    let printed = out.all();
    assert!(
        printed.iter().all(|line| !line.contains("iat_")),
        "{printed:?}"
    );

    let list = stdout(&iagent(&[
        "app",
        "list",
        "--data",
        dir.path().to_str().unwrap(),
    ]));
    assert_eq!(
        list.lines()
            .filter(|line| line.starts_with("default "))
            .count(),
        1,
        "{list}"
    );
}

/// A data directory serves one gateway: a second `serve` on it is refused at once, naming the
/// directory, while app commands still work beside the first, whose clients get replies on a
/// token made meanwhile. Once the first has stopped, the directory serves again.
#[test]
fn a_second_gateway_on_one_data_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let (mut first, url, _) = first_start(dir.path());

    let second = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data", data])
        .env("IAGENT_LOG", "warn")
        .output()
        .expect("iagent runs");
    assert!(!second.status.success());
    let refusal = String::from_utf8_lossy(&second.stderr);
    assert!(
        refusal.contains("another gateway is serving from the data directory")
            && refusal.contains(data),
        "{refusal}"
    );
    assert!(
        second.stdout.is_empty(),
        "nothing is printed, no token above all"
    );

    let token = stdout(&iagent(&["app", "create", "shop", "--data", data]))
        .trim()
        .to_owned();
    let reply = iagent(&["send", "--url", &url, "--token", &token, "beside"]);
    assert_eq!(stdout(&reply).trim(), "beside");
    assert!(terminate(&mut first).success());

    let mut again = serve(dir.path());
    let mut err = Lines::of(again.stderr.take().unwrap());
    err.wait_for("serving");
    assert!(terminate(&mut again).success());
}

#[test]
fn app_commands_print_tokens_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let is_token = |text: &str| {
        let token = text.trim_end_matches('\n');
        text.lines().count() == 1
            && token
                .strip_prefix("iat_")
                .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
    };

    let created = stdout(&iagent(&["app", "create", "shop", "--data", data]));
    assert!(
        is_token(&created),
        "create prints only the token: {created:?}"
    );
    let rotated = stdout(&iagent(&["app", "rotate-token", "shop", "--data", data]));
    assert!(is_token(&rotated), "{rotated:?}");
    assert_ne!(created, rotated);

    let list = stdout(&iagent(&["app", "list", "--data", data]));
    let row: Vec<&str> = list
        .lines()
        .find(|line| line.starts_with("shop "))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(&row[..3], ["shop", "echo", "1"], "{list}");

    let revoked = iagent(&["app", "revoke-token", "shop", "--data", data]);
    assert!(revoked.status.success());
    assert!(String::from_utf8_lossy(&revoked.stderr).contains("revoked 1 token"));
    let list = stdout(&iagent(&["app", "list", "--data", data]));
    assert!(
        list.lines()
            .any(|line| line.split_whitespace().collect::<Vec<_>>()[..3] == ["shop", "echo", "0"])
    );

    let duplicate = iagent(&["app", "create", "shop", "--data", data]);
    assert!(!duplicate.status.success());
    assert!(String::from_utf8_lossy(&duplicate.stderr).contains("exists already"));
    let unknown = iagent(&["app", "rotate-token", "nope", "--data", data]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no app named \"nope\""));
}

#[test]
fn an_invalid_configuration_is_refused_with_every_problem_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("iagent.toml");
    std::fs::write(
        &config,
        "[limits]\nmax_frame_bytes = 0\n[timeouts]\nping_interval_ms = 0\n",
    )
    .unwrap();
    let output = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--data")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("limits.max_frame_bytes"), "{stderr}");
    assert!(stderr.contains("timeouts.ping_interval_ms"), "{stderr}");
}

#[test]
fn the_printed_default_configuration_is_accepted_by_serve() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("iagent.toml");
    std::fs::write(&config, stdout(&iagent(&["config"]))).unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--data")
        .arg(dir.path().join("data"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = Lines::of(child.stderr.take().unwrap());
    err.wait_for("serving");
    let status = terminate(&mut child);
    assert!(status.success(), "{status}: {:?}", err.all());
}

#[test]
fn a_closed_log_pipe_does_not_take_the_gateway_down() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = serve(dir.path());
    let mut out = Lines::of(child.stdout.take().unwrap());
    let mut stderr = child.stderr.take().unwrap();
    let mut first = String::new();
    while !first.contains("serving") {
        let mut byte = [0u8; 1];
        std::io::Read::read_exact(&mut stderr, &mut byte).expect("a log line");
        first.push(char::from(byte[0]));
    }
    drop(stderr);
    // Logged to the closed pipe: a refused upgrade, then the shutdown.
    let command = out.wait_for(" send ");
    let (url, _) = url_and_token(&command);
    assert!(
        !iagent(&["send", "--url", &url, "--token", "iat_forged", "hi"])
            .status
            .success()
    );
    assert!(
        terminate(&mut child).success(),
        "the gateway kept serving and stopped cleanly"
    );
}

#[test]
fn a_first_start_with_an_invalid_configuration_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("iagent.toml");
    std::fs::write(&config, "[limits]\noutbound_queue = 0\n").unwrap();
    let data = dir.path().join("data");
    let output = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("limits.outbound_queue"));
    assert!(
        !String::from_utf8_lossy(&output.stdout).contains("iat_"),
        "no token printed"
    );
    assert!(!data.exists(), "no data directory made");
}

#[test]
fn bench_drives_a_gateway_and_reports_every_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, url, token) = first_start(dir.path());
    let (url, token) = (url.as_str(), token.as_str());
    let json = dir.path().join("bench.json");
    let pid = child.id().to_string();
    let args = [
        "bench",
        "--url",
        url,
        "--token",
        token,
        "--connections",
        "2",
        "--users",
        "50",
        "--window",
        "8",
        "--duration",
        "0.5",
        "--warmup",
        "0.2",
        "--group-share",
        "0.25",
        "--server-pid",
        &pid,
        "--json",
    ];
    let output = Command::new(BIN).args(args).arg(&json).output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(results["round_trips"].as_u64().unwrap() > 0, "{results}");
    assert_eq!(
        results["errors"]["not_ok"], 0,
        "group messages are addressed, so all get 0"
    );
    assert_eq!(results["errors"]["unanswered"], 0);
    assert!(results["server_cpu_seconds_per_100k"].as_f64().is_some());
    assert!(stdout(&output).contains("round trips:"));
    assert!(terminate(&mut child).success());
}

#[test]
fn agents_managed_from_the_cli_and_the_configuration_answer_in_a_running_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_arg = data.to_str().unwrap();
    let token = stdout(&iagent(&["app", "create", "shop", "--data", data_arg]))
        .trim()
        .to_owned();
    let config = dir.path().join("iagent.toml");
    std::fs::write(
        &config,
        "[timeouts]\nagent_reload_ms = 50\n\n[[agents]]\napp = \"shop\"\nid = \"declared\"\nkind = \"echo\"\n\
         config = { strategy = { group = \"always\" } }\n",
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data",
            data_arg,
            "--config",
        ])
        .arg(&config)
        .env("IAGENT_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = Lines::of(child.stderr.take().unwrap());
    let serving = err.wait_for("serving");
    let address = serving
        .split_whitespace()
        .find_map(|w| w.strip_prefix("address="))
        .unwrap();
    let url = format!("ws://{address}");
    let send = |agent: &str| {
        iagent(&[
            "send", "--url", &url, "--token", &token, "--agent", agent, "ping",
        ])
    };

    // Declared in the file: answers from the start.
    assert_eq!(stdout(&send("declared")).trim(), "ping");
    let list = stdout(&iagent(&["agent", "list", "shop", "--data", data_arg]));
    assert!(
        list.lines()
            .any(|l| l.starts_with("declared ") && l.contains(r#""group":"always""#)),
        "{list}"
    );

    // Added while serving: answers once the gateway has reloaded.
    assert!(
        iagent(&[
            "agent", "add", "shop", "added", "--kind", "echo", "--data", data_arg
        ])
        .status
        .success()
    );
    let deadline = std::time::Instant::now() + WAIT;
    while !send("added").status.success() {
        assert!(
            std::time::Instant::now() < deadline,
            "the added agent never answered"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Refused before anything is stored.
    let bad = iagent(&[
        "agent",
        "add",
        "shop",
        "x",
        "--kind",
        "telepathy",
        "--data",
        data_arg,
    ]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown kind \"telepathy\""));
    let bad = iagent(&[
        "agent", "add", "shop", "x", "--kind", "echo", "--config", "[]", "--data", data_arg,
    ]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("must be a JSON object"));
    let removing_default = iagent(&["agent", "remove", "shop", "echo", "--data", data_arg]);
    assert!(String::from_utf8_lossy(&removing_default.stderr).contains("is the default agent"));

    // Removed while serving: refused (40) once reloaded.
    assert!(
        iagent(&["agent", "remove", "shop", "added", "--data", data_arg])
            .status
            .success()
    );
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let output = send("added");
        if !output.status.success() {
            let printed = String::from_utf8_lossy(&output.stdout);
            assert!(
                printed.contains("[40]") && printed.contains("is not an agent"),
                "{printed}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the removed agent kept answering"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(terminate(&mut child).success());
}

#[test]
fn chat_sends_each_line_and_prints_each_reply() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().unwrap();
    let (mut child, url, token) = first_start(dir.path());
    let (url, token) = (url.as_str(), token.as_str());
    let mut chat = Command::new(BIN)
        .args(["chat", "--url", url, "--token", token, "--user", "alice"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    chat.stdin
        .take()
        .unwrap()
        .write_all(b"hello\n\n  second line \n/quit\nnot sent\n")
        .unwrap();
    let output = chat.wait_with_output().unwrap();
    assert!(output.status.success());
    let printed = String::from_utf8(output.stdout).unwrap();
    assert_eq!(
        printed.lines().collect::<Vec<_>>(),
        ["echo> hello", "echo> second line"],
        "{printed}"
    );
    assert!(terminate(&mut child).success());
}
