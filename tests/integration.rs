//! The five seed tests of the core issue, through the client library against an
//! in-process broker.

mod common;

use common::{TestBroker, recv, within};
use ferry::MessageId;

#[tokio::test]
async fn test_publish_and_consume() {
    let broker = TestBroker::start().await;
    let mut producer = broker.producer("orders").await;
    let mut consumer = broker.consumer("orders", 10).await;

    let id = within(producer.publish("hello, ferry")).await.unwrap();
    let message = recv(&mut consumer).await;
    assert_eq!(message.id, id);
    assert_eq!(message.payload, "hello, ferry");
    assert_eq!(message.attempt, 1);
    within(consumer.ack(id)).await.unwrap();

    common::eventually("the ack is applied", || {
        broker.metrics().core.acked_total == 1
    })
    .await;
    assert_eq!(broker.metrics().core.in_flight, 0);
    let report = broker.shutdown().await;
    assert!(report.completed);
}

#[tokio::test]
async fn test_producer_gets_ok() {
    let broker = TestBroker::start().await;
    // On the wire: exactly {"type":"ok","id":N}, ids increasing.
    let mut raw = common::RawClient::producer(broker.addr, "default").await;
    raw.send(serde_json::json!({"type": "publish", "payload": "first"}))
        .await;
    let first = raw.expect_ok().await;
    raw.send(serde_json::json!({"type": "publish", "payload": "second"}))
        .await;
    let second = raw.expect_ok().await;
    let first_id = first["id"].as_u64().expect("ok carries an integer id");
    let second_id = second["id"].as_u64().unwrap();
    assert!(second_id > first_id);
    assert_eq!(first.as_object().unwrap().len(), 2, "{first}");

    // Through the library, the id is returned.
    let mut producer = broker.producer("default").await;
    let third = within(producer.publish("third")).await.unwrap();
    assert_eq!(third, MessageId(second_id + 1));
}

#[tokio::test]
async fn test_round_robin_two_consumers() {
    let broker = TestBroker::start().await;
    let mut first = broker.consumer("work", 10).await;
    let mut second = broker.consumer("work", 10).await;
    let mut producer = broker.producer("work").await;
    let outcomes = within(producer.publish_all(["m1", "m2", "m3", "m4"], 4))
        .await
        .unwrap();
    assert!(outcomes.iter().all(Result::is_ok));

    let mut got_first = Vec::new();
    let mut got_second = Vec::new();
    for _ in 0..2 {
        got_first.push(recv(&mut first).await.payload);
        got_second.push(recv(&mut second).await.payload);
    }
    assert_eq!(got_first, ["m1", "m3"]);
    assert_eq!(got_second, ["m2", "m4"]);
    common::eventually("all four are in flight", || {
        broker.metrics().core.in_flight == 4
    })
    .await;
}

#[tokio::test]
async fn test_messages_queued_before_consumer() {
    let broker = TestBroker::start().await;
    let mut producer = broker.producer("later").await;
    let payloads = ["a", "b", "c"];
    let ids = common::publish_ids(&mut producer, &payloads).await;
    common::eventually("three messages wait", || broker.metrics().core.ready == 3).await;

    let mut consumer = broker.consumer("later", 10).await;
    for (id, payload) in ids.iter().zip(payloads) {
        let message = recv(&mut consumer).await;
        assert_eq!(
            (message.id, message.payload.as_str(), message.attempt),
            (*id, payload, 1)
        );
        within(consumer.ack(message.id)).await.unwrap();
    }
}

#[tokio::test]
async fn test_multiple_producers_single_consumer() {
    let broker = TestBroker::start().await;
    let mut consumer = broker.consumer("shared", 100).await;
    let mut publishers = Vec::new();
    for p in 0..3 {
        let mut producer = broker.producer("shared").await;
        publishers.push(tokio::spawn(async move {
            let payloads: Vec<String> = (0..20).map(|i| format!("p{p}-{i}")).collect();
            let outcomes = producer
                .publish_all(payloads.iter().map(String::as_str), 5)
                .await
                .unwrap();
            assert!(outcomes.iter().all(Result::is_ok));
        }));
    }
    for publisher in publishers {
        within(publisher).await.unwrap();
    }

    let mut seen: Vec<Vec<usize>> = vec![Vec::new(); 3];
    for _ in 0..60 {
        let message = recv(&mut consumer).await;
        let (p, i) = message.payload[1..].split_once('-').unwrap();
        seen[p.parse::<usize>().unwrap()].push(i.parse().unwrap());
        consumer.queue_ack(message.id);
    }
    within(consumer.flush()).await.unwrap();
    for (p, indices) in seen.iter().enumerate() {
        assert_eq!(
            *indices,
            (0..20).collect::<Vec<_>>(),
            "producer {p}'s messages, in its order"
        );
    }
    common::eventually("all 60 acked", || broker.metrics().core.acked_total == 60).await;
}
