//! Every error code of contract §5: fatal ones send the error frame and close the
//! connection; non-fatal ones leave it usable, which each test then shows by using it.

mod common;

use std::time::Duration;

use common::{RawClient, TestBroker, eventually, test_config, within};
use ferry::broker::BrokerConfig;
use ferry::broker::auth::Access;
use ferry::broker::core::{
    MESSAGE_OVERHEAD_BYTES, QUEUE_OVERHEAD_BYTES, READY_LEVEL_BYTES, READY_SLOT_BYTES,
};
use serde_json::json;

async fn assert_fatal_first_frame(broker: &TestBroker, body: &[u8], code: &str) {
    let mut client = RawClient::connect(broker.addr).await;
    client.send_body(body).await;
    client.expect_error(code).await;
    client.expect_closed().await;
}

#[tokio::test]
async fn frame_too_large_for_a_zero_or_oversized_length_is_fatal() {
    let broker = TestBroker::start_with(BrokerConfig {
        max_frame_bytes: 1024,
        ..test_config()
    })
    .await;
    for prefix in [0u32, 1025, u32::MAX] {
        let mut client = RawClient::producer(broker.addr, "q").await;
        client.send_bytes(&prefix.to_be_bytes()).await;
        let error = client.expect_error("frame_too_large").await;
        assert!(
            error["message"]
                .as_str()
                .unwrap()
                .contains(&prefix.to_string()),
            "{error}"
        );
        client.expect_closed().await;
    }
    // Also before registration.
    let mut client = RawClient::connect(broker.addr).await;
    client.send_bytes(&2000u32.to_be_bytes()).await;
    client.expect_error("frame_too_large").await;
    client.expect_closed().await;
}

#[tokio::test]
async fn frame_too_large_comes_after_the_replies_to_earlier_frames() {
    let broker = TestBroker::start_with(BrokerConfig {
        max_frame_bytes: 256,
        ..test_config()
    })
    .await;
    let mut client = RawClient::producer(broker.addr, "q").await;
    let mut pipelined: Vec<u8> = ["a", "b"]
        .iter()
        .flat_map(|payload| common::frame(&json!({"type": "publish", "payload": payload})))
        .collect();
    pipelined.extend_from_slice(&257u32.to_be_bytes());
    client.send_bytes(&pipelined).await;
    client.expect_ok().await;
    client.expect_ok().await;
    client.expect_error("frame_too_large").await;
    client.expect_closed().await;
    eventually("both publishes were kept", || {
        broker.metrics().core.ready == 2
    })
    .await;
}

#[tokio::test]
async fn not_registered_for_any_first_frame_that_is_not_a_valid_register() {
    let broker = TestBroker::start().await;
    let bodies: [&[u8]; 12] = [
        br#"{"type":"publish","payload":"x"}"#,
        br#"{"type":"ack","id":1}"#,
        br#"{"type":"register"}"#,
        br#"{"type":"register","role":"admin"}"#,
        br#"{"type":"register","role":"producer","queue":"has space"}"#,
        br#"{"type":"register","role":"producer","queue":""}"#,
        br#"{"type":"register","role":"consumer","prefetch":0}"#,
        br#"{"type":"register","role":"consumer","prefetch":65536}"#,
        br#"{"type":"Register","role":"producer"}"#,
        b"not json",
        b"[1,2,3]",
        br#"{"role":"producer"}"#,
    ];
    for body in bodies {
        assert_fatal_first_frame(&broker, body, "not_registered").await;
    }
    broker.assert_serves_a_fresh_pair().await;
}

#[tokio::test]
async fn not_registered_names_what_was_wrong() {
    let broker = TestBroker::start().await;
    let mut client = RawClient::connect(broker.addr).await;
    client
        .send(json!({"type": "register", "role": "producer", "queue": "x y"}))
        .await;
    let error = client.expect_error("not_registered").await;
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("queue name `x y` has a space"),
        "{message}"
    );
}

#[tokio::test]
async fn unauthorized_when_the_token_is_missing_wrong_or_not_granted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("auth.toml");
    std::fs::write(
        &path,
        "[[grant]]\ntoken = \"p-token\"\nroles = [\"producer\"]\nqueues = [\"orders\", \"billing.*\"]\n\n\
         [[grant]]\ntoken = \"c-token\"\nroles = [\"consumer\"]\nqueues = [\"orders\"]\n",
    )
    .unwrap();
    let broker = TestBroker::start_with(BrokerConfig {
        access: Access::load(&path).unwrap(),
        ..test_config()
    })
    .await;
    let refused = [
        json!({"type": "register", "role": "producer", "queue": "orders"}),
        json!({"type": "register", "role": "producer", "queue": "orders", "token": "wrong"}),
        json!({"type": "register", "role": "consumer", "queue": "orders", "token": "p-token"}),
        json!({"type": "register", "role": "producer", "queue": "other", "token": "p-token"}),
    ];
    for register in refused {
        let mut client = RawClient::connect(broker.addr).await;
        client.send(register.clone()).await;
        let error = client.expect_error("unauthorized").await;
        assert!(
            !error["message"].as_str().unwrap().contains("token\":"),
            "{error}"
        );
        client.expect_closed().await;
    }
    for (role, queue, token) in [
        ("producer", "billing.eu", "p-token"),
        ("consumer", "orders", "c-token"),
    ] {
        let mut client = RawClient::connect(broker.addr).await;
        client
            .send(json!({"type": "register", "role": role, "queue": queue, "token": token}))
            .await;
        client.expect_ok().await;
    }
    let options = ferry::ProducerOptions {
        queue: "orders".into(),
        token: Some("p-token".into()),
        tls: None,
        ..ferry::ProducerOptions::default()
    };
    let mut producer = within(ferry::Producer::connect_with(broker.addr, &options))
        .await
        .unwrap();
    within(producer.publish("granted")).await.unwrap();
    let denied = within(ferry::Producer::connect(broker.addr, "orders"))
        .await
        .err()
        .unwrap();
    assert_eq!(denied.code(), Some(ferry::ErrorCode::Unauthorized));
}

#[tokio::test]
async fn register_timeout_closes_a_silent_connection() {
    let broker = TestBroker::start_with(BrokerConfig {
        register_timeout: Duration::from_millis(300),
        ..test_config()
    })
    .await;
    let mut silent = RawClient::connect(broker.addr).await;
    silent.expect_error("register_timeout").await;
    silent.expect_closed().await;
    // Half a frame does not count as registering.
    let mut dribbling = RawClient::connect(broker.addr).await;
    dribbling.send_bytes(&[0, 0, 0, 40, b'{']).await;
    dribbling.expect_error("register_timeout").await;
    dribbling.expect_closed().await;
    // A registered connection is not timed out.
    let mut registered = RawClient::producer(broker.addr, "q").await;
    let mut late = RawClient::connect(broker.addr).await;
    late.expect_error("register_timeout").await;
    registered
        .send(json!({"type": "publish", "payload": "still here"}))
        .await;
    registered.expect_ok().await;
}

#[tokio::test]
async fn too_many_connections_refuses_beyond_the_limit_and_frees_slots() {
    let broker = TestBroker::start_with(BrokerConfig {
        max_connections: 2,
        ..test_config()
    })
    .await;
    let first = RawClient::producer(broker.addr, "q").await;
    let mut second = RawClient::producer(broker.addr, "q").await;
    let mut third = RawClient::connect(broker.addr).await;
    third.expect_error("too_many_connections").await;
    third.expect_closed().await;
    // An unregistered connection holds a slot too.
    drop(first);
    eventually("the closed slot is free", || {
        broker.metrics().connections == 1
    })
    .await;
    let mut again = RawClient::producer(broker.addr, "q").await;
    again
        .send(json!({"type": "publish", "payload": "in"}))
        .await;
    again.expect_ok().await;
    second.sync().await;
}

#[tokio::test]
async fn invalid_frame_is_not_fatal() {
    let broker = TestBroker::start().await;
    let mut producer = RawClient::producer(broker.addr, "q").await;
    let bad: [&[u8]; 9] = [
        b"not json at all",
        b"[\"an\",\"array\"]",
        b"42",
        br#"{"no":"type"}"#,
        br#"{"type":"subscribe"}"#,
        br#"{"type":"PUBLISH","payload":"x"}"#,
        br#"{"type":"publish","payload":42}"#,
        br#"{"type":"publish"}"#,
        br#"{"type":"publish","payload":"x"} trailing"#,
    ];
    for body in bad {
        producer.send_body(body).await;
        producer.expect_error("invalid_frame").await;
    }
    producer
        .send(json!({"type": "publish", "payload": "fine", "extra": {"ignored": true}}))
        .await;
    producer.expect_ok().await;

    let mut consumer = RawClient::consumer(broker.addr, "q", 10).await;
    consumer.expect_message().await;
    for body in [
        &br#"{"type":"ack","id":"7"}"#[..],
        br#"{"type":"ack","id":-1}"#,
        br#"{"type":"ack","id":1.5}"#,
        br#"{"type":"ack","id":18446744073709551616}"#,
        br#"{"type":"ack"}"#,
    ] {
        consumer.send_body(body).await;
        consumer.expect_error("invalid_frame").await;
    }
}

#[tokio::test]
async fn wrong_role_is_not_fatal() {
    let broker = TestBroker::start().await;
    let mut producer = RawClient::producer(broker.addr, "q").await;
    producer.send(json!({"type": "ack", "id": 1})).await;
    producer.expect_error("wrong_role").await;
    producer
        .send(json!({"type": "publish", "payload": "x"}))
        .await;
    let ok = producer.expect_ok().await;

    let mut consumer = RawClient::consumer(broker.addr, "q", 10).await;
    let message = consumer.expect_message().await;
    consumer
        .send(json!({"type": "publish", "payload": "nope"}))
        .await;
    consumer.expect_error("wrong_role").await;
    consumer.send(json!({"type": "ack", "id": ok["id"]})).await;
    consumer.sync().await;
    assert_eq!(message["id"], ok["id"]);
    eventually("the ack after wrong_role worked", || {
        broker.metrics().core.acked_total == 1
    })
    .await;
}

#[tokio::test]
async fn already_registered_is_not_fatal() {
    let broker = TestBroker::start().await;
    let mut producer = RawClient::producer(broker.addr, "q").await;
    producer
        .send(json!({"type": "register", "role": "consumer", "queue": "other"}))
        .await;
    producer.expect_error("already_registered").await;
    producer
        .send(json!({"type": "register", "role": "producer", "queue": "q"}))
        .await;
    producer.expect_error("already_registered").await;
    producer
        .send(json!({"type": "publish", "payload": "still a producer"}))
        .await;
    producer.expect_ok().await;
}

#[tokio::test]
async fn unknown_id_is_not_fatal_and_changes_nothing() {
    let broker = TestBroker::start().await;
    let mut producer = RawClient::producer(broker.addr, "q").await;
    producer
        .send(json!({"type": "publish", "payload": "x"}))
        .await;
    let id = producer.expect_ok().await["id"].as_u64().unwrap();
    let mut holder = RawClient::consumer(broker.addr, "q", 10).await;
    assert_eq!(holder.expect_message().await["id"], id);
    let mut other = RawClient::consumer(broker.addr, "q", 10).await;

    // Never delivered to this consumer; and an id that does not exist at all.
    for wrong in [id, 999_999] {
        other.send(json!({"type": "ack", "id": wrong})).await;
        let error = other.expect_error("unknown_id").await;
        assert_eq!(error["id"], wrong);
    }
    assert_eq!(
        broker.metrics().core.in_flight,
        1,
        "the holder still has it"
    );
    holder.send(json!({"type": "ack", "id": id})).await;
    holder.sync().await;
    // Already acked.
    holder.send(json!({"type": "ack", "id": id})).await;
    assert_eq!(holder.expect_error("unknown_id").await["id"], id);
    holder.sync().await;
}

#[tokio::test]
async fn queue_full_when_the_memory_limit_is_reached_and_not_fatal() {
    let payload = "x".repeat(40); // 42 bytes as a JSON literal
    let message = 42 + MESSAGE_OVERHEAD_BYTES;
    let queue = QUEUE_OVERHEAD_BYTES + "q".len() as u64 + READY_LEVEL_BYTES + 4 * READY_SLOT_BYTES;
    let broker = TestBroker::start_with(BrokerConfig {
        // Room for the queue and two of the messages, not three.
        max_memory_bytes: queue + 2 * message + 10,
        ..test_config()
    })
    .await;
    let mut producer = RawClient::producer(broker.addr, "q").await;
    for _ in 0..2 {
        producer
            .send(json!({"type": "publish", "payload": payload}))
            .await;
        producer.expect_ok().await;
    }
    producer
        .send(json!({"type": "publish", "payload": payload}))
        .await;
    let error = producer.expect_error("queue_full").await;
    assert!(
        error["message"].as_str().unwrap().contains("--max-memory"),
        "{error}"
    );

    // Room again once a consumer acks.
    let mut consumer = RawClient::consumer(broker.addr, "q", 10).await;
    let first = consumer.expect_message().await;
    consumer.expect_message().await;
    consumer
        .send(json!({"type": "ack", "id": first["id"]}))
        .await;
    consumer.sync().await;
    producer
        .send(json!({"type": "publish", "payload": payload}))
        .await;
    producer.expect_ok().await;
}

#[tokio::test]
async fn shutting_down_answers_publishes_during_the_drain() {
    let broker = TestBroker::start_with(BrokerConfig {
        ack_timeout: Duration::from_secs(600),
        ..test_config()
    })
    .await;
    let mut producer = RawClient::producer(broker.addr, "q").await;
    producer
        .send(json!({"type": "publish", "payload": "held"}))
        .await;
    let id = producer.expect_ok().await["id"].clone();
    let mut consumer = RawClient::consumer(broker.addr, "q", 10).await;
    consumer.expect_message().await;

    broker.begin_shutdown();
    // The drain waits for the unacked message, so the producer stays connected. The core
    // notices the shutdown on its next turn: publishes race it until the first refusal.
    let mut accepted_while_racing = 0;
    loop {
        producer
            .send(json!({"type": "publish", "payload": "racing"}))
            .await;
        let reply = producer.recv().await;
        if reply["type"] == "error" {
            assert_eq!(reply["code"], "shutting_down", "{reply}");
            break;
        }
        assert_eq!(reply["type"], "ok", "{reply}");
        accepted_while_racing += 1;
        tokio::task::yield_now().await;
    }
    for _ in 0..3 {
        producer
            .send(json!({"type": "publish", "payload": "later"}))
            .await;
        producer.expect_error("shutting_down").await;
    }

    // The drain still delivers and takes acks.
    consumer.send(json!({"type": "ack", "id": id})).await;
    for _ in 0..accepted_while_racing {
        let message = consumer.expect_message().await;
        consumer
            .send(json!({"type": "ack", "id": message["id"]}))
            .await;
    }
    let report = broker.shutdown().await;
    assert!(report.completed);
    assert_eq!(report.drain.delivered, accepted_while_racing);
}

#[tokio::test]
async fn replies_keep_the_order_of_the_frames_they_answer() {
    let broker = TestBroker::start().await;
    let mut producer = RawClient::producer(broker.addr, "q").await;
    let frames = [
        json!({"type": "publish", "payload": "1"}),
        json!({"type": "bogus"}),
        json!({"type": "publish", "payload": "2"}),
        json!({"type": "ack", "id": 1}),
        json!({"type": "publish", "payload": 3}),
        json!({"type": "publish", "payload": "4"}),
        json!({"type": "register", "role": "producer"}),
    ];
    let pipelined: Vec<u8> = frames.iter().flat_map(common::frame).collect();
    producer.send_bytes(&pipelined).await;
    let mut replies = Vec::new();
    for _ in &frames {
        let reply = producer.recv().await;
        replies.push(if reply["type"] == "ok" {
            "ok".to_owned()
        } else {
            reply["code"].as_str().unwrap().to_owned()
        });
    }
    assert_eq!(
        replies,
        [
            "ok",
            "invalid_frame",
            "ok",
            "wrong_role",
            "invalid_frame",
            "ok",
            "already_registered"
        ]
    );
}
