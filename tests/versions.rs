//! Version negotiation (contract §8), over real sockets: what a register that asks for a
//! version gets back, what one that does not gets, and that a connection speaking 1.0 is
//! served exactly as sections 1-7 say.

mod common;

use common::{RawClient, TestBroker};
use ferry::protocol::Version;
use serde_json::json;

/// A `null` version counts as absent, as a `null` field does on every frame.
#[tokio::test]
async fn a_register_without_a_version_gets_exactly_the_1_0_ok() {
    let broker = TestBroker::start().await;
    for register in [
        json!({"type": "register", "role": "producer", "queue": "q"}),
        json!({"type": "register", "role": "producer", "queue": "q", "version": null}),
    ] {
        let mut client = RawClient::connect(broker.addr).await;
        client.send(register).await;
        assert_eq!(client.recv_body().await, br#"{"type":"ok"}"#);
    }
}

#[tokio::test]
async fn a_register_that_asks_for_a_version_is_told_the_one_it_speaks() {
    let broker = TestBroker::start().await;
    let supported = Version::SUPPORTED.to_string();
    for (asked, speaks) in [
        ("1", "1.0"),
        ("1.0", "1.0"),
        ("1.1", supported.as_str()),
        ("1.7", supported.as_str()),
    ] {
        for role in ["producer", "consumer"] {
            let mut client = RawClient::connect(broker.addr).await;
            client
                .send(json!({"type": "register", "role": role, "queue": "q", "version": asked}))
                .await;
            let ok = client.recv_body().await;
            let expected = format!(r#"{{"type":"ok","version":"{speaks}"}}"#);
            assert_eq!(
                String::from_utf8_lossy(&ok),
                expected,
                "{role} asking for {asked}"
            );
        }
    }
}

#[tokio::test]
async fn a_version_that_is_not_a_string_1_n_is_not_registered_and_fatal() {
    let broker = TestBroker::start().await;
    for version in [
        json!("2.0"),
        json!("abc"),
        json!(1.1),
        json!(1),
        json!("1."),
        json!("1.1.0"),
        json!(""),
    ] {
        let mut client = RawClient::connect(broker.addr).await;
        client
            .send(json!({"type": "register", "role": "producer", "queue": "q", "version": version}))
            .await;
        let error = client.expect_error("not_registered").await;
        let message = error["message"].as_str().unwrap();
        assert!(message.contains("version"), "{version}: {message}");
        client.expect_closed().await;
    }
    broker.assert_serves_a_fresh_pair().await;
}

/// A connection that negotiated 1.0 is served as sections 1-7 say: message frames carry
/// only `type`, `id`, `payload` and `attempt`.
#[tokio::test]
async fn a_connection_that_negotiated_1_0_is_served_as_version_1_0() {
    let broker = TestBroker::start().await;
    let mut producer = RawClient::connect(broker.addr).await;
    producer
        .send(json!({"type": "register", "role": "producer", "queue": "q", "version": "1.0"}))
        .await;
    producer.expect_ok().await;
    producer
        .send(json!({"type": "publish", "payload": "hi"}))
        .await;
    let id = producer.expect_ok().await["id"].as_u64().unwrap();

    let mut consumer = RawClient::connect(broker.addr).await;
    consumer
        .send(json!({"type": "register", "role": "consumer", "queue": "q", "version": "1"}))
        .await;
    consumer.expect_ok().await;
    let delivered = consumer.recv_body().await;
    assert_eq!(
        String::from_utf8_lossy(&delivered),
        format!(r#"{{"type":"message","id":{id},"payload":"hi","attempt":1}}"#)
    );
}
