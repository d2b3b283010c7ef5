//! TLS: certificates are generated at run time (rcgen); the broker serves TLS only;
//! clients that trust its certificate work end to end, a plaintext client is refused in
//! words it can read, a client that trusts another CA fails its handshake, and the
//! handshake counts against the register timeout.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{BrokerProcess, RawClient, TestBroker, recv, run_ferry, test_config, within};
use ferry::broker::BrokerConfig;
use ferry::transport::{ClientTls, ServerTls};
use ferry::{ClientError, Consumer, ConsumerOptions, ErrorCode, Producer, ProducerOptions};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// A self-signed certificate for localhost and 127.0.0.1, written as PEM files.
fn self_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

async fn tls_broker(dir: &Path, max_connections: usize) -> (TestBroker, PathBuf) {
    let (cert, key) = self_signed(dir, "broker");
    let broker = TestBroker::start_with(BrokerConfig {
        tls: Some(ServerTls::from_pem_files(&cert, &key).unwrap()),
        max_connections,
        ..test_config()
    })
    .await;
    (broker, cert)
}

#[tokio::test]
async fn clients_that_trust_the_broker_work_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, cert) = tls_broker(dir.path(), 100).await;
    let tls = Some(ClientTls::with_ca_file(&cert).unwrap());
    let producer_options = ProducerOptions {
        queue: "secure".into(),
        tls: tls.clone(),
        ..ProducerOptions::default()
    };
    let consumer_options = ConsumerOptions {
        queue: "secure".into(),
        prefetch: 10,
        tls,
        ..ConsumerOptions::default()
    };
    let mut producer = within(Producer::connect_with(broker.addr, &producer_options))
        .await
        .unwrap();
    let mut consumer = within(Consumer::connect_with(broker.addr, &consumer_options))
        .await
        .unwrap();
    let payloads: Vec<String> = (0..500)
        .map(|i| format!("secret {i} {}", "x".repeat(i)))
        .collect();
    let outcomes = within(producer.publish_all(payloads.iter().map(String::as_str), 64))
        .await
        .unwrap();
    assert!(outcomes.iter().all(Result::is_ok));
    for payload in &payloads {
        let message = recv(&mut consumer).await;
        assert_eq!(&message.payload, payload);
        consumer.queue_ack(message.id);
    }
    within(consumer.flush()).await.unwrap();
    common::eventually("all acked over TLS", || {
        broker.metrics().core.acked_total == 500
    })
    .await;
}

#[tokio::test]
async fn a_plaintext_client_on_the_tls_port_is_refused_in_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, _) = tls_broker(dir.path(), 100).await;
    let mut plain = RawClient::connect(broker.addr).await;
    plain
        .send(json!({"type": "register", "role": "producer"}))
        .await;
    let refusal = plain.expect_error("not_registered").await;
    assert!(
        refusal["message"].as_str().unwrap().contains("TLS"),
        "{refusal}"
    );
    plain.expect_closed().await;
    // The library says the same.
    let err = within(Producer::connect(broker.addr, "q"))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Some(ErrorCode::NotRegistered));
}

#[tokio::test]
async fn a_client_trusting_another_ca_fails_its_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, _) = tls_broker(dir.path(), 100).await;
    let (other_ca, _) = self_signed(dir.path(), "other");
    let options = ProducerOptions {
        queue: "q".into(),
        tls: Some(ClientTls::with_ca_file(&other_ca).unwrap()),
        ..ProducerOptions::default()
    };
    let err = within(Producer::connect_with(broker.addr, &options))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, ClientError::Connect { .. }), "{err}");
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );
    // And the broker is unharmed.
    assert_eq!(broker.metrics().core.published_total, 0);
}

#[tokio::test]
async fn the_connection_limit_answers_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, cert) = tls_broker(dir.path(), 1).await;
    let tls = Some(ClientTls::with_ca_file(&cert).unwrap());
    let options = ProducerOptions {
        queue: "q".into(),
        tls,
        ..ProducerOptions::default()
    };
    let _first = within(Producer::connect_with(broker.addr, &options))
        .await
        .unwrap();
    let refused = within(Producer::connect_with(broker.addr, &options))
        .await
        .err()
        .unwrap();
    assert_eq!(refused.code(), Some(ErrorCode::TooManyConnections));
}

#[tokio::test]
async fn the_cli_speaks_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path(), "cli");
    let (cert, key) = (
        cert.to_str().unwrap().to_owned(),
        key.to_str().unwrap().to_owned(),
    );
    let broker = BrokerProcess::start(&["--tls-cert", &cert, "--tls-key", &key]);
    let addr = broker.addr.to_string();
    let produced = run_ferry(
        &["producer", "--addr", &addr, "--tls-ca", &cert, "over tls"],
        "",
        &[],
    )
    .await;
    assert!(produced.status.success(), "{produced:?}");
    let consumed = run_ferry(
        &[
            "consumer", "--addr", &addr, "--tls-ca", &cert, "--count", "1",
        ],
        "",
        &[],
    )
    .await;
    assert_eq!(String::from_utf8_lossy(&consumed.stdout), "over tls\n");
    let plain = run_ferry(&["producer", "--addr", &addr, "not over tls"], "", &[]).await;
    assert!(!plain.status.success());
    assert!(
        String::from_utf8_lossy(&plain.stderr).contains("TLS"),
        "{plain:?}"
    );
}

#[tokio::test]
async fn the_bench_runs_over_tls_with_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path(), "bench");
    let auth = dir.path().join("auth.toml");
    std::fs::write(
        &auth,
        "[[grant]]\ntoken = \"bench-secret-token\"\nroles = [\"producer\", \"consumer\"]\nqueues = [\"bench\"]\n",
    )
    .unwrap();
    let broker_flags = [
        format!("--broker-arg=--tls-cert={}", cert.display()),
        format!("--broker-arg=--tls-key={}", key.display()),
        format!("--broker-arg=--auth-file={}", auth.display()),
    ];
    let cert_path = cert.display().to_string();
    let mut args = vec![
        "bench", "--json", "-m", "2000", "-w", "64", "-q", "32", "--tls-ca", &cert_path,
    ];
    args.extend(broker_flags.iter().map(String::as_str));

    let output = run_ferry(
        &[&args[..], &["--token", "bench-secret-token"]].concat(),
        "",
        &[],
    )
    .await;
    assert!(output.status.success(), "{output:?}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["confirmed"], 2000, "{report}");
    assert_eq!(report["delivered"], 2000, "{report}");
    assert_eq!(report["lost"], 0, "{report}");

    let refused = run_ferry(
        &[&args[..], &["--token", "a-wrong-token-value"]].concat(),
        "",
        &[],
    )
    .await;
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("unauthorized"),
        "{refused:?}"
    );
}

/// "No register within 10 s of connecting": a TLS handshake spends that time too, so a
/// client that handshakes late has only what is left of it, not a fresh timeout.
#[tokio::test]
async fn the_register_timeout_counts_from_the_connect_not_from_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path(), "broker");
    let timeout = Duration::from_secs(2);
    let broker = TestBroker::start_with(BrokerConfig {
        tls: Some(ServerTls::from_pem_files(&cert, &key).unwrap()),
        register_timeout: timeout,
        ..test_config()
    })
    .await;
    let connected = Instant::now();
    let tcp = TcpStream::connect(broker.addr).await.unwrap();
    // A slow client: three quarters of the timeout pass before its handshake starts.
    tokio::time::sleep(timeout * 3 / 4).await;
    let client = ClientTls::with_ca_file(&cert).unwrap();
    let mut stream = within(client.connect("127.0.0.1", tcp)).await.unwrap();
    let mut length = [0u8; 4];
    within(stream.read_exact(&mut length)).await.unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(length) as usize];
    within(stream.read_exact(&mut body)).await.unwrap();
    let frame: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(frame["code"], "register_timeout", "{frame}");
    // A timeout started after the handshake would come 1.75 timeouts after the connect.
    let waited = connected.elapsed();
    assert!(
        waited < timeout * 3 / 2,
        "register_timeout came {waited:?} after the connect; the timeout is {timeout:?}"
    );
}

/// rustls takes what a connection writes into its own buffer whether or not the socket
/// takes it, so a TLS client that reads nothing can leave bytes that only a flush would
/// send: closing such a connection (after a fatal error, a half-close, or at the end of
/// a shutdown) flushed without a deadline, and a graceful shutdown waited forever.
#[tokio::test]
async fn tls_clients_that_never_read_cannot_hold_up_a_shutdown() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let (broker, cert) = tls_broker(dir.path(), 100).await;
    let tls = ClientTls::with_ca_file(&cert).unwrap();
    let mut held = Vec::new();
    // Plenty of garbage, each frame answered with an error the client never reads; then
    // nothing more, a fatal length, or the end of the client's side.
    for (frames, ending) in [(60_000, 0u8), (30_000, 1), (30_000, 2)] {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let tcp = socket.connect(broker.addr).await.unwrap();
        let mut stream = tls.connect("localhost", tcp).await.unwrap();
        let mut bytes = common::frame(&json!({"type": "register", "role": "producer"}));
        for _ in 0..frames {
            bytes.extend(common::frame_of_body(b"x"));
        }
        if ending == 1 {
            bytes.extend(u32::MAX.to_be_bytes());
        }
        let patience = Duration::from_millis(500);
        let _ = tokio::time::timeout(patience, stream.write_all(&bytes)).await;
        let _ = tokio::time::timeout(patience, stream.flush()).await;
        if ending == 2 {
            let _ = tokio::time::timeout(patience, stream.shutdown()).await;
        }
        held.push(stream);
    }
    // within() fails the test if the shutdown takes longer than common::WAIT.
    broker.shutdown().await;
    drop(held);
}
