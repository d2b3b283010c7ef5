//! The command line of contract §7, run as outside tests run it: the real binary, its
//! stdout, its exit status.

mod common;

use std::time::{Duration, Instant};

use common::{BrokerProcess, RawClient, run_ferry, unix_ms};

/// The ids `ferry producer` printed, one decimal number a line.
fn printed_ids(output: &std::process::Output) -> Vec<u64> {
    stdout_lines(output)
        .iter()
        .map(|line| line.parse().expect("a decimal id"))
        .collect()
}

/// The command failed, and its stderr says `said`.
fn assert_refused_saying(output: &std::process::Output, said: &str) {
    assert!(!output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(said), "{stderr}");
}

fn stdout_lines(output: &std::process::Output) -> Vec<String> {
    String::from_utf8(output.stdout.clone())
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn producer_prints_ids_and_consumer_prints_payloads() {
    let broker = BrokerProcess::start(&[]);
    let addr = broker.addr.to_string();
    let produced = run_ferry(
        &[
            "producer",
            "--addr",
            &addr,
            "--queue",
            "cli",
            "first",
            "second thing",
            "3",
        ],
        "",
        &[],
    )
    .await;
    assert!(produced.status.success(), "{produced:?}");
    let ids: Vec<u64> = printed_ids(&produced);
    assert_eq!(ids.len(), 3);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");

    let consumed = run_ferry(
        &[
            "consumer", "--addr", &addr, "--queue", "cli", "--count", "3",
        ],
        "",
        &[],
    )
    .await;
    assert!(consumed.status.success(), "{consumed:?}");
    assert_eq!(stdout_lines(&consumed), ["first", "second thing", "3"]);
}

#[tokio::test]
async fn producer_reads_lines_from_stdin_and_addr_comes_from_ferry_addr() {
    let broker = BrokerProcess::start(&[]);
    let addr = broker.addr.to_string();
    let env = [("FERRY_ADDR", addr.as_str())];
    let lines: Vec<String> = (0..2500).map(|i| format!("line {i}")).collect();
    let input = lines.join("\n") + "\n";
    let produced = run_ferry(&["producer", "--queue", "stdin"], &input, &env).await;
    assert!(produced.status.success(), "{produced:?}");
    assert_eq!(stdout_lines(&produced).len(), 2500);

    let consumed = run_ferry(
        &["consumer", "--queue", "stdin", "--count", "2500"],
        "",
        &env,
    )
    .await;
    assert!(consumed.status.success(), "{consumed:?}");
    assert_eq!(stdout_lines(&consumed), lines);
}

#[tokio::test]
async fn consumer_count_takes_exactly_n_and_leaves_the_rest() {
    let broker = BrokerProcess::start(&[]);
    let addr = broker.addr.to_string();
    let produced = run_ferry(&["producer", "--addr", &addr, "a", "b", "c", "d"], "", &[]).await;
    assert!(produced.status.success());
    let first = run_ferry(&["consumer", "--addr", &addr, "--count", "2"], "", &[]).await;
    assert_eq!(stdout_lines(&first), ["a", "b"]);
    let second = run_ferry(
        &[
            "consumer",
            "--addr",
            &addr,
            "--count",
            "2",
            "--prefetch",
            "1",
        ],
        "",
        &[],
    )
    .await;
    assert_eq!(stdout_lines(&second), ["c", "d"]);
}

#[tokio::test]
async fn producer_exits_non_zero_when_a_publish_is_refused() {
    // Room for the queue and one short message with their bookkeeping, not two.
    let broker = BrokerProcess::start(&["--max-memory", "600"]);
    let addr = broker.addr.to_string();
    let produced = run_ferry(
        &[
            "producer",
            "--addr",
            &addr,
            "fits",
            "this one is too long to fit beside it",
        ],
        "",
        &[],
    )
    .await;
    assert!(!produced.status.success());
    assert_eq!(
        stdout_lines(&produced).len(),
        1,
        "the accepted one is still printed"
    );
    let stderr = String::from_utf8_lossy(&produced.stderr);
    assert!(stderr.contains("queue_full"), "{stderr}");
}

#[tokio::test]
async fn bad_flags_and_unreachable_brokers_fail_with_a_reason() {
    let broker = BrokerProcess::start(&[]);
    let addr = broker.addr.to_string();
    let bad_queue = run_ferry(
        &["producer", "--addr", &addr, "--queue", "x y", "m"],
        "",
        &[],
    )
    .await;
    assert_refused_saying(&bad_queue, "has a space");

    let bad_prefetch = run_ferry(&["consumer", "--addr", &addr, "--prefetch", "0"], "", &[]).await;
    assert!(!bad_prefetch.status.success());

    for flags in [
        ["--ack-timeout", "0s"],
        ["--ack-timeout", "400days"],
        ["--drain-timeout", "10000000000000000000s"],
    ] {
        let refused = run_ferry(
            &["broker", "--addr", "127.0.0.1:0", flags[0], flags[1]],
            "",
            &[],
        )
        .await;
        assert!(!refused.status.success(), "{flags:?} accepted");
        assert!(
            String::from_utf8_lossy(&refused.stderr).contains("out of range"),
            "{flags:?}: {refused:?}"
        );
    }
    let bad_duration = run_ferry(
        &["broker", "--addr", "127.0.0.1:0", "--drain-timeout", "soon"],
        "",
        &[],
    )
    .await;
    assert!(!bad_duration.status.success());

    drop(broker);
    let nobody = run_ferry(&["producer", "--addr", &addr, "m"], "", &[]).await;
    assert!(!nobody.status.success());
    assert!(
        String::from_utf8_lossy(&nobody.stderr).contains("cannot connect"),
        "{nobody:?}"
    );
}

#[tokio::test]
async fn the_binary_enforces_the_ten_second_register_timeout() {
    let broker = BrokerProcess::start(&[]);
    let connected = Instant::now();
    let mut silent = RawClient::connect(broker.addr).await;
    silent.expect_error("register_timeout").await;
    let waited = connected.elapsed();
    assert!(
        waited >= Duration::from_secs(10),
        "timed out after {waited:?}"
    );
    silent.expect_closed().await;
}

#[tokio::test]
async fn the_broker_logs_each_connection_with_its_queue() {
    let broker = BrokerProcess::start(&[]);
    let addr = broker.addr.to_string();
    let produced = run_ferry(
        &["producer", "--addr", &addr, "--queue", "logged", "x"],
        "",
        &[],
    )
    .await;
    assert!(produced.status.success());
    let line = broker.wait_for_log("registered").await;
    assert!(
        line.contains("role=producer")
            && line.contains("queue=logged")
            && line.contains("conn{id="),
        "{line}"
    );
}

/// The broker keeps its memory in small pages (see `disable_transparent_huge_pages`).
#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_broker_runs_without_transparent_huge_pages() {
    let broker = BrokerProcess::start(&[]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", broker.child.id()))
        .expect("the broker's /proc status");
    let thp_enabled = status
        .lines()
        .find_map(|line| line.strip_prefix("THP_enabled:"))
        .map(str::trim);
    // Kernels before 6.4 do not report the flag; nothing to check there.
    if let Some(enabled) = thp_enabled {
        assert_eq!(enabled, "0", "THP left on for the broker");
    }
}

async fn bench_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["bench", "--json"];
    all.extend_from_slice(args);
    let output = run_ferry(&all, "", &[]).await;
    assert!(output.status.success(), "{output:?}");
    serde_json::from_slice(&output.stdout).expect("a JSON report")
}

#[tokio::test]
async fn bench_accounts_for_every_message() {
    let report = bench_json(&["-m", "3000", "-p", "2", "-c", "2", "-w", "64", "-q", "32"]).await;
    assert_eq!(report["confirmed"], 3000);
    assert_eq!(report["delivered"], 3000);
    assert_eq!(report["lost"], 0);
    assert_eq!(report["duplicates"], 0);
    assert!(report["msgs_per_sec"].as_f64().unwrap() > 0.0, "{report}");
    assert!(
        report["latency_us"]["p99"].as_f64().unwrap()
            >= report["latency_us"]["p50"].as_f64().unwrap()
    );
    assert!(
        report["broker_peak_rss_mb"].as_f64().unwrap() > 0.0,
        "figures of the broker it started"
    );
}

#[tokio::test]
async fn bench_over_many_queues_at_a_rate_against_a_multi_threaded_broker() {
    let report = bench_json(&[
        "--queues",
        "20",
        "--rate",
        "2000",
        "--duration",
        "1s",
        "-s",
        "300",
        "--runs",
        "2",
        "--broker-arg=--threads=2",
    ])
    .await;
    assert_eq!(report["runs"], 2);
    let confirmed = report["confirmed"].as_u64().unwrap();
    assert!(confirmed > 0);
    assert_eq!(report["delivered"].as_u64().unwrap(), confirmed);
    assert_eq!(report["lost"], 0);
}

#[tokio::test]
async fn bench_without_consumers_leaves_everything_queued() {
    let report = bench_json(&["-m", "2000", "-c", "0"]).await;
    assert_eq!(report["confirmed"], 2000);
    assert_eq!(report["delivered"], 0);
    assert_eq!(report["lost"], 0);
}

#[tokio::test]
async fn the_broker_refuses_a_malformed_auth_file_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("auth.toml");
    std::fs::write(
        &path,
        "[[grant]]\ntoken = \"t0ken-value\"\nroles = [\"producer\", \"admin\"]\nqueues = [\"q\"]\n",
    )
    .unwrap();
    let out = run_ferry(
        &[
            "broker",
            "--addr",
            "127.0.0.1:0",
            "--auth-file",
            path.to_str().unwrap(),
        ],
        "",
        &[],
    )
    .await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("line 3") && stderr.contains("unknown role `admin`"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("t0ken-value"),
        "the token was printed: {stderr}"
    );
}

#[tokio::test]
async fn auth_warnings_and_tokens_never_in_the_log() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("auth.toml");
    std::fs::write(
        &path,
        "[[grant]]\ntoken = \"a-very-secret-token\"\nroles = [\"producer\"]\nqueues = [\"q\"]\n",
    )
    .unwrap();
    let auth = path.to_str().unwrap();

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let broker = BrokerProcess::start(&["--auth-file", auth]);
    broker.wait_for_log("readable by other users").await;
    let addr = broker.addr.to_string();
    let env = [("FERRY_TOKEN", "a-very-secret-token")];
    let granted = run_ferry(
        &["producer", "--addr", &addr, "--queue", "q", "m"],
        "",
        &env,
    )
    .await;
    assert!(granted.status.success(), "{granted:?}");
    let wrong = run_ferry(
        &[
            "producer",
            "--addr",
            &addr,
            "--queue",
            "q",
            "--token",
            "a-wrong-secret-token",
            "m",
        ],
        "",
        &[],
    )
    .await;
    assert_refused_saying(&wrong, "unauthorized");
    broker.wait_for_log("closing the connection").await;
    let log = broker.log_text();
    assert!(
        !log.contains("a-very-secret-token") && !log.contains("a-wrong-secret-token"),
        "a token was logged:\n{log}"
    );
    assert!(!log.contains("open to every client"));
    drop(broker);

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let private = BrokerProcess::start(&["--auth-file", auth]);
    assert!(!private.log_text().contains("readable by other users"));
    let open = BrokerProcess::start(&[]);
    assert_eq!(open.log_text().matches("open to every client").count(), 1);
}

#[tokio::test]
async fn a_token_of_any_type_is_never_echoed_or_logged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("auth.toml");
    std::fs::write(
        &path,
        "[[grant]]\ntoken = \"t\"\nroles = [\"producer\"]\nqueues = [\"q\"]\n",
    )
    .unwrap();
    let broker = BrokerProcess::start(&["--auth-file", path.to_str().unwrap()]);
    let secrets = [
        serde_json::json!(918273645),
        serde_json::json!({"nested": "secret-in-an-object"}),
        serde_json::json!(["secret-in-an-array"]),
        serde_json::json!(true),
    ];
    for token in &secrets {
        let mut client = RawClient::connect(broker.addr).await;
        client
            .send(serde_json::json!({"type": "register", "role": "producer", "queue": "q", "token": token}))
            .await;
        let error = client.expect_error("not_registered").await;
        let message = error["message"].as_str().unwrap();
        assert!(message.contains("token"), "{message}");
        for needle in ["918273645", "secret-in", "true"] {
            assert!(!message.contains(needle), "{token} echoed: {message}");
        }
        client.expect_closed().await;
    }
    common::eventually("every refusal is logged", || {
        broker.log_text().matches("closing the connection").count() >= secrets.len()
    })
    .await;
    let log = broker.log_text();
    assert!(
        !log.contains("918273645") && !log.contains("secret-in-"),
        "a token was logged:\n{log}"
    );
}

/// §16: `ferry producer --delay` holds every message back that long; `ferry consumer
/// --json` prints each message frame as one JSON line, with the 1.1 details.
#[tokio::test]
async fn producer_delay_holds_messages_and_consumer_json_prints_frames() {
    let broker = BrokerProcess::start(&[]);
    let addr = broker.addr.to_string();
    let sent_ms = unix_ms();
    let produced = run_ferry(
        &[
            "producer", "--addr", &addr, "--delay", "400ms", "later", "x \"y\"",
        ],
        "",
        &[],
    )
    .await;
    assert!(produced.status.success(), "{produced:?}");
    let ids: Vec<u64> = printed_ids(&produced);
    let consumed = run_ferry(
        &["consumer", "--addr", &addr, "--count", "2", "--json"],
        "",
        &[],
    )
    .await;
    assert!(consumed.status.success(), "{consumed:?}");
    assert!(unix_ms() >= sent_ms + 400, "delivered early");
    let frames: Vec<serde_json::Value> = stdout_lines(&consumed)
        .iter()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect();
    for (frame, (id, payload)) in frames.iter().zip(ids.iter().zip(["later", "x \"y\""])) {
        let published_at = frame["published_at"].as_u64().unwrap();
        assert!(published_at + 1 >= sent_ms, "{frame}");
        assert_eq!(
            frame,
            &serde_json::json!({"type": "message", "id": id, "payload": payload, "attempt": 1,
                "priority": 0, "published_at": published_at, "ack_timeout_ms": 5000})
        );
    }
    let bad = run_ferry(
        &["producer", "--addr", &addr, "--delay", "soon", "x"],
        "",
        &[],
    )
    .await;
    assert_refused_saying(&bad, "--delay");
}

/// §16: `ferry producer --priority N` publishes every message with that priority; out
/// of 0-9 it is refused before connecting, naming the flag.
#[tokio::test]
async fn producer_priority_sends_messages_ahead() {
    let broker = BrokerProcess::start(&[]);
    let addr = broker.addr.to_string();
    for (priority, payload) in [("0", "routine"), ("8", "urgent")] {
        let produced = run_ferry(
            &["producer", "--addr", &addr, "--priority", priority, payload],
            "",
            &[],
        )
        .await;
        assert!(produced.status.success(), "{produced:?}");
    }
    let consumed = run_ferry(
        &["consumer", "--addr", &addr, "--count", "2", "--json"],
        "",
        &[],
    )
    .await;
    assert!(consumed.status.success(), "{consumed:?}");
    let got: Vec<(String, u64)> = stdout_lines(&consumed)
        .iter()
        .map(|line| {
            let frame: serde_json::Value = serde_json::from_str(line).unwrap();
            let payload = frame["payload"].as_str().unwrap().to_owned();
            (payload, frame["priority"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(got, [("urgent".to_owned(), 8), ("routine".to_owned(), 0)]);
    let bad = run_ferry(
        &["producer", "--addr", &addr, "--priority", "10", "x"],
        "",
        &[],
    )
    .await;
    assert_refused_saying(&bad, "--priority");
}

/// §16: `ferry producer --header KEY=VALUE` (repeatable) attaches headers to every
/// message, which `ferry consumer --json` shows; a header the contract refuses is refused
/// before connecting, saying why.
#[tokio::test]
async fn producer_headers_reach_the_consumer() {
    let broker = BrokerProcess::start(&[]);
    let addr = broker.addr.to_string();
    let produced = run_ferry(
        &[
            "producer",
            "--addr",
            &addr,
            "--header",
            "trace=ab12",
            "--header",
            "note=a=b \"c\"",
            "job",
        ],
        "",
        &[],
    )
    .await;
    assert!(produced.status.success(), "{produced:?}");
    let consumed = run_ferry(
        &["consumer", "--addr", &addr, "--count", "1", "--json"],
        "",
        &[],
    )
    .await;
    assert!(consumed.status.success(), "{consumed:?}");
    let frame: serde_json::Value = serde_json::from_str(&stdout_lines(&consumed)[0]).unwrap();
    assert_eq!(
        frame["headers"],
        serde_json::json!({"trace": "ab12", "note": "a=b \"c\""})
    );
    for (bad, saying) in [
        ("novalue", "has no `=`"),
        ("ferry.id=1", "starts with `ferry.`"),
        ("a b=1", "use [A-Za-z0-9._-]"),
    ] {
        let refused = run_ferry(
            &["producer", "--addr", &addr, "--header", bad, "x"],
            "",
            &[],
        )
        .await;
        assert_refused_saying(&refused, saying);
    }
}

/// The bench's 1.1 workloads: every message nacked once is delivered twice and counted
/// once; delayed publishes are all delivered, latency then being lateness; batches carry
/// every message.
#[tokio::test]
async fn bench_nacks_and_delays_account_for_every_message() {
    let report = bench_json(&["-m", "2000", "--nack-ratio", "1", "-w", "64", "-q", "32"]).await;
    assert_eq!(report["confirmed"], 2000);
    assert_eq!(report["delivered"], 2000);
    assert_eq!(report["nacked"], 2000);
    assert_eq!(report["duplicates"], 0);
    assert_eq!(report["lost"], 0);
    let report = bench_json(&["-m", "2000", "--delay", "300ms", "-w", "256"]).await;
    assert_eq!(report["delivered"], 2000);
    assert_eq!(report["delay_ms"], 300);
    assert_eq!(report["lost"], 0);
    // Batches: the last one is short (2000 = 19 x 105 + 5), all confirmed and delivered.
    let report = bench_json(&["-m", "2000", "--batch", "105", "-w", "500"]).await;
    assert_eq!(report["confirmed"], 2000);
    assert_eq!(report["delivered"], 2000);
    assert_eq!(report["batch"], 105);
    assert_eq!(report["lost"], 0);
}
