//! Connection floods: ten thousand idle connections held open while a producer and a
//! consumer keep working, and the memory they cost the broker.

mod common;

use std::time::Instant;

use common::{
    BrokerProcess, RawClient, connect_consumer, publish_ids, raise_open_file_limit, recv, within,
};
use ferry::Producer;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_connections_while_a_pair_keeps_working() {
    // This process holds the client ends; the broker, a child, inherits the raised limit
    // for the server ends. A machine whose hard limit is lower gets as many as it allows.
    let limit = raise_open_file_limit();
    let idle = 10_000.min(limit.saturating_sub(300) as usize);
    assert!(
        idle >= 1000,
        "the open-file hard limit ({limit}) is too low for this test"
    );
    let max = (idle + 10).to_string();
    let broker = BrokerProcess::start(&["--max-connections", &max]);
    let pid = broker.child.id();
    let rss_before = rss_kib(pid);

    let started = Instant::now();
    let mut held = Vec::with_capacity(idle);
    while held.len() < idle {
        let mut batch = tokio::task::JoinSet::new();
        for _ in 0..(idle - held.len()).min(500) {
            let addr = broker.addr;
            batch.spawn(async move { RawClient::producer(addr, "idle").await });
        }
        while let Some(client) = within(batch.join_next()).await {
            held.push(client.unwrap());
        }
    }
    let opened_in = started.elapsed();
    let rss_held = rss_kib(pid);

    // Work goes on, correctly, beside them.
    let mut producer = within(Producer::connect(broker.addr, "work"))
        .await
        .unwrap();
    let mut consumer = connect_consumer(broker.addr, "work", 100).await;
    let working = Instant::now();
    let payloads: Vec<String> = (0..2000).map(|i| format!("w{i}")).collect();
    let refs: Vec<&str> = payloads.iter().map(String::as_str).collect();
    let ids = publish_ids(&mut producer, &refs).await;
    for (id, payload) in ids.iter().zip(&payloads) {
        let message = recv(&mut consumer).await;
        assert_eq!((&message.id, &message.payload), (id, payload));
        consumer.queue_ack(message.id);
    }
    within(consumer.flush()).await.unwrap();
    // And the idle ones are still being served.
    for client in held.iter_mut().step_by(997) {
        client.sync().await;
    }
    println!(
        "floods: {idle} idle connections opened in {:.1} s; broker RSS {} MiB -> {} MiB ({:.1} KiB per connection); \
         2,000 messages through a working pair beside them in {:.2} s",
        opened_in.as_secs_f64(),
        rss_before / 1024,
        rss_held / 1024,
        (rss_held - rss_before) as f64 / idle as f64,
        working.elapsed().as_secs_f64()
    );
}
