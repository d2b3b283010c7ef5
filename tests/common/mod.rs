//! Test support shared by the integration tests: an in-process broker on 127.0.0.1:0
//! whose shutdown the test controls, a raw protocol client for sending exactly the bytes
//! a test wants, the `ferry` binary as a child process, and polling with a deadline in
//! place of sleeps.

#![allow(dead_code)] // Each test file uses a different part of this module.

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;

use ferry::broker::metrics::{BrokerMetrics, MetricsSnapshot};
use ferry::broker::{BrokerConfig, BrokerError, Server, ShutdownReport};
use ferry::protocol::codec::FrameDecoder;
use ferry::{Consumer, ConsumerOptions, Message, MessageId, Producer};

/// Upper bound on any single wait in a test: generous, because CI machines are busy, and
/// only reached when something is broken.
pub const WAIT: Duration = Duration::from_secs(20);

/// A broker config for tests: loopback, port 0, a short ack timeout.
pub fn test_config() -> BrokerConfig {
    BrokerConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        ack_timeout: Duration::from_millis(300),
        ..BrokerConfig::default()
    }
}

/// A test config with the durable log in `dir` (small segments, so tests roll over).
pub fn durable_config(dir: &std::path::Path) -> BrokerConfig {
    BrokerConfig {
        storage: Some(ferry::storage::StorageConfig {
            dir: dir.to_owned(),
            fsync: ferry::storage::FsyncPolicy::Always,
            segment_bytes: 64 * 1024,
            repair: false,
        }),
        ..test_config()
    }
}

/// Total bytes of the files in `dir`.
pub fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().metadata().unwrap().len())
        .sum()
}

/// A broker running in this process.
pub struct TestBroker {
    pub addr: SocketAddr,
    pub metrics: Arc<BrokerMetrics>,
    shutdown: CancellationToken,
    serving: JoinHandle<Result<ShutdownReport, BrokerError>>,
}

impl TestBroker {
    pub async fn start() -> TestBroker {
        Self::start_with(test_config()).await
    }

    pub async fn start_with(config: BrokerConfig) -> TestBroker {
        let server = Server::bind(config).await.expect("bind 127.0.0.1:0");
        let addr = server.local_addr().unwrap();
        let metrics = server.metrics();
        let shutdown = CancellationToken::new();
        let serving = tokio::spawn(server.run(shutdown.clone()));
        TestBroker {
            addr,
            metrics,
            shutdown,
            serving,
        }
    }

    pub fn metrics(&self) -> MetricsSnapshot {
        self.metrics.snapshot()
    }

    /// Starts the graceful shutdown without waiting for it.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Shuts down gracefully and returns the broker's report.
    pub async fn shutdown(self) -> ShutdownReport {
        self.shutdown.cancel();
        within(self.serving).await.unwrap().unwrap()
    }

    pub async fn producer(&self, queue: &str) -> Producer {
        within(Producer::connect(self.addr, queue)).await.unwrap()
    }

    pub async fn consumer(&self, queue: &str, prefetch: u16) -> Consumer {
        connect_consumer(self.addr, queue, prefetch).await
    }

    /// Checks that the broker still serves a fresh producer and consumer correctly, on a
    /// queue of their own.
    pub async fn assert_serves_a_fresh_pair(&self) {
        let queue = format!("fresh-{}", rand_suffix());
        let mut producer = self.producer(&queue).await;
        let mut consumer = self.consumer(&queue, 10).await;
        let ids = publish_ids(&mut producer, &["one", "two", "three"]).await;
        for (expected_id, expected_payload) in ids.iter().zip(["one", "two", "three"]) {
            let message = recv(&mut consumer).await;
            assert_eq!(
                (message.id, message.payload.as_str()),
                (*expected_id, expected_payload)
            );
            within(consumer.ack(message.id)).await.unwrap();
        }
    }
}

/// A consumer of `queue` at `addr`, registered.
pub async fn connect_consumer(addr: SocketAddr, queue: &str, prefetch: u16) -> Consumer {
    let options = ConsumerOptions {
        queue: queue.into(),
        prefetch,
        token: None,
        tls: None,
        ..ConsumerOptions::default()
    };
    within(Consumer::connect_with(addr, &options))
        .await
        .unwrap()
}

/// Publishes every payload (pipelined) and returns their ids; any refusal fails the test.
pub async fn publish_ids(producer: &mut Producer, payloads: &[&str]) -> Vec<MessageId> {
    within(producer.publish_all(payloads.iter().copied(), 100))
        .await
        .unwrap()
        .into_iter()
        .map(|outcome| outcome.expect("publish confirmed"))
        .collect()
}

/// `value` as one frame: its length prefix, then its JSON.
pub fn frame(value: &Value) -> Vec<u8> {
    frame_of_body(value.to_string().as_bytes())
}

/// `body` behind a correct length prefix.
pub fn frame_of_body(body: &[u8]) -> Vec<u8> {
    let mut framed = (body.len() as u32).to_be_bytes().to_vec();
    framed.extend_from_slice(body);
    framed
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Awaits `future`, failing the test if it takes longer than [`WAIT`].
pub async fn within<F: Future>(future: F) -> F::Output {
    tokio::time::timeout(WAIT, future)
        .await
        .expect("timed out: the awaited event did not happen")
}

/// The next delivery, failing the test on error or after [`WAIT`].
pub async fn recv(consumer: &mut Consumer) -> Message {
    within(consumer.recv()).await.expect("a delivery")
}

/// Polls `condition` every few milliseconds until it holds; fails after [`WAIT`].
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Raises this process's soft limit on open files to its hard limit (a clean machine's
/// soft limit is often 1024) and returns the new limit.
pub fn raise_open_file_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
    hard
}

/// Milliseconds since the Unix epoch, by this machine's clock (the broker's too).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// `frame` with the fields of `extra` added (or replaced).
/// A message frame's `id` and `attempt`.
pub fn id_and_attempt(message: &Value) -> (Option<u64>, Option<u64>) {
    (message["id"].as_u64(), message["attempt"].as_u64())
}

pub fn with_fields(mut frame: Value, extra: Value) -> Value {
    if let (Some(frame), Some(extra)) = (frame.as_object_mut(), extra.as_object()) {
        frame.extend(extra.clone());
    }
    frame
}

/// A client that sends exactly the bytes a test gives it, and reads frames as JSON.
pub struct RawClient {
    stream: TcpStream,
    decoder: FrameDecoder,
    buf: BytesMut,
}

/// What the broker did with the connection when a test expected it to close.
pub fn is_closed_by_peer(result: &std::io::Result<usize>) -> bool {
    match result {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::BrokenPipe
        ),
    }
}

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> RawClient {
        let stream = within(TcpStream::connect(addr)).await.unwrap();
        stream.set_nodelay(true).unwrap();
        RawClient::from_stream(stream)
    }

    /// A client on a stream already connected.
    pub fn from_stream(stream: TcpStream) -> RawClient {
        RawClient {
            stream,
            decoder: FrameDecoder::new(u32::MAX as usize),
            buf: BytesMut::new(),
        }
    }

    pub async fn producer(addr: SocketAddr, queue: &str) -> RawClient {
        let mut client = RawClient::connect(addr).await;
        client
            .send(json!({"type": "register", "role": "producer", "queue": queue}))
            .await;
        client.expect_ok().await;
        client
    }

    pub async fn consumer(addr: SocketAddr, queue: &str, prefetch: u16) -> RawClient {
        let mut client = RawClient::connect(addr).await;
        client
            .send(json!({"type": "register", "role": "consumer", "queue": queue, "prefetch": prefetch}))
            .await;
        client.expect_ok().await;
        client
    }

    /// A connection registered with version 1.1 and the register's `extra` fields; the
    /// `ok` must say it speaks 1.1.
    pub async fn register_1_1(
        addr: SocketAddr,
        role: &str,
        queue: &str,
        extra: Value,
    ) -> RawClient {
        let mut client = RawClient::connect(addr).await;
        let register = json!({"type": "register", "version": "1.1", "role": role, "queue": queue});
        client.send(with_fields(register, extra)).await;
        assert_eq!(
            client.expect_ok().await,
            json!({"type": "ok", "version": "1.1"})
        );
        client
    }

    /// A producer registered with version 1.1.
    pub async fn producer_1_1(addr: SocketAddr, queue: &str) -> RawClient {
        RawClient::register_1_1(addr, "producer", queue, json!({})).await
    }

    /// A consumer registered with version 1.1.
    pub async fn consumer_1_1(addr: SocketAddr, queue: &str, prefetch: u16) -> RawClient {
        RawClient::register_1_1(addr, "consumer", queue, json!({"prefetch": prefetch})).await
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        within(self.stream.write_all(bytes)).await.unwrap();
    }

    /// Sends as much of `bytes` as the broker takes: a refusal may close the connection
    /// before it has read them all.
    pub async fn send_bytes_unchecked(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    /// Sends `body` as one frame with a correct length prefix.
    pub async fn send_body(&mut self, body: &[u8]) {
        self.send_bytes(&frame_of_body(body)).await;
    }

    pub async fn send(&mut self, value: Value) {
        self.send_body(value.to_string().as_bytes()).await;
    }

    /// The next frame, parsed; fails the test if the connection ends first.
    pub async fn recv(&mut self) -> Value {
        serde_json::from_slice(&self.recv_body().await).unwrap()
    }

    /// The next frame's body, byte for byte; fails the test if the connection ends first.
    pub async fn recv_body(&mut self) -> Vec<u8> {
        within(async {
            loop {
                if let Some(body) = self.decoder.decode(&mut self.buf).unwrap() {
                    return body.to_vec();
                }
                let n = self.stream.read_buf(&mut self.buf).await.expect("read");
                assert!(n > 0, "connection closed while a frame was expected");
            }
        })
        .await
    }

    pub async fn expect_ok(&mut self) -> Value {
        let frame = self.recv().await;
        assert_eq!(frame["type"], "ok", "expected ok, got {frame}");
        frame
    }

    pub async fn expect_error(&mut self, code: &str) -> Value {
        let frame = self.recv().await;
        assert_eq!(frame["type"], "error", "expected error {code}, got {frame}");
        assert_eq!(frame["code"], code, "got {frame}");
        assert!(
            frame["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{frame}"
        );
        frame
    }

    pub async fn expect_message(&mut self) -> Value {
        let frame = self.recv().await;
        assert_eq!(frame["type"], "message", "expected a delivery, got {frame}");
        frame
    }

    /// Every frame until the broker closes the connection.
    pub async fn read_until_closed(&mut self) -> Vec<Value> {
        within(async {
            let mut frames = Vec::new();
            loop {
                while let Some(body) = self.decoder.decode(&mut self.buf).unwrap() {
                    frames.push(serde_json::from_slice(&body).unwrap());
                }
                let read = self.stream.read_buf(&mut self.buf).await;
                if is_closed_by_peer(&read) {
                    return frames;
                }
                read.expect("read");
            }
        })
        .await
    }

    /// Asserts the broker closes the connection, with no frame left unread before it.
    pub async fn expect_closed(&mut self) {
        assert!(self.buf.is_empty() || self.decoder.decode(&mut self.buf).unwrap().is_none());
        let result = within(self.stream.read_buf(&mut self.buf)).await;
        assert!(
            is_closed_by_peer(&result),
            "expected the broker to close, read {result:?}: {:?}",
            self.buf
        );
    }

    /// Proves every earlier frame was handled and nothing else was sent in between: a
    /// frame of unknown type must be answered next, with `invalid_frame`.
    pub async fn sync(&mut self) {
        self.send(json!({"type": "sync-probe"})).await;
        self.expect_error("invalid_frame").await;
    }

    pub fn into_stream(self) -> TcpStream {
        self.stream
    }
}

/// The `ferry` binary, built by cargo for the integration tests.
pub fn ferry_binary() -> &'static str {
    env!("CARGO_BIN_EXE_ferry")
}

/// `ferry broker` as a child process, with its stderr collected.
pub struct BrokerProcess {
    pub child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl BrokerProcess {
    /// Starts `ferry broker --addr 127.0.0.1:0 ARGS` and waits for `listening on`.
    pub fn start(args: &[&str]) -> BrokerProcess {
        Self::start_with(args, |_| {})
    }

    /// [`BrokerProcess::start`], with the command adjusted first (limits, umask, env).
    pub fn start_with(args: &[&str], adjust: impl FnOnce(&mut Command)) -> BrokerProcess {
        let mut command = Command::new(ferry_binary());
        command
            .args(["broker", "--addr", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        adjust(&mut command);
        let mut child = command.spawn().expect("spawn ferry broker");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let collected = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.split("listening on ").nth(1) {
                    let _ = addr_tx.send(addr.trim().parse::<SocketAddr>().unwrap());
                }
                collected.lock().unwrap().push(line);
            }
        });
        let addr = addr_rx.recv_timeout(WAIT).unwrap_or_else(|_| {
            panic!(
                "the broker never said `listening on`: {:?}",
                log.lock().unwrap()
            )
        });
        BrokerProcess { child, addr, log }
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).expect("send signal");
    }

    /// Waits for the broker to exit; fails after `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the broker did not exit within {limit:?}: {}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Polls the collected log until a line contains `needle`.
    pub async fn wait_for_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(line) = self.log.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return line.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needle:?} in:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Runs `ferry ARGS` with `stdin` as its input and `env` added; kills it and fails the
/// test if it runs longer than [`WAIT`].
pub async fn run_ferry(args: &[&str], stdin: &str, env: &[(&str, &str)]) -> std::process::Output {
    let mut child = tokio::process::Command::new(ferry_binary())
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn ferry");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).await.unwrap();
    drop(input);
    within(child.wait_with_output()).await.unwrap()
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What `/proc/PID/io` says process `pid` has written through system calls (`wchar`):
/// files and sockets alike.
pub fn bytes_written_by(pid: u32) -> u64 {
    proc_io_field(pid, "wchar")
}

fn proc_io_field(pid: u32, field: &str) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).expect("read /proc/PID/io");
    io.lines()
        .find_map(|line| line.strip_prefix(&format!("{field}: ")))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/io: {io}"))
}

/// The resident set size of process `pid`, from `/proc/PID/status`.
pub fn rss_bytes(pid: u32) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"));
    kib * 1024
}
