//! Micro-benchmarks of the wire format: encode and decode of every frame type, with the
//! canonical (fast) and general (serde) spellings, so a regression shows per piece.
//! Run with `cargo bench --bench codec`.

use bytes::BytesMut;
use criterion::{Bencher, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ferry::protocol::client_frame::{ClientFrame, InboundFrame};
use ferry::protocol::codec::FrameDecoder;
use ferry::protocol::server_frame::{ReceivedFrame, ServerFrame};
use ferry::protocol::{ErrorCode, MessageId, Payload, Role};
use std::hint::black_box;
use tokio_util::codec::Decoder;

fn encoded(frame: &ClientFrame<'_>) -> Vec<u8> {
    let mut buf = BytesMut::new();
    frame.encode(&mut buf);
    buf[4..].to_vec()
}

/// Times `encode` appending to a buffer that is reused, as a connection's is.
fn bench_encode(b: &mut Bencher<'_>, capacity: usize, mut encode: impl FnMut(&mut BytesMut)) {
    let mut buf = BytesMut::with_capacity(capacity);
    b.iter(|| {
        buf.clear();
        encode(&mut buf);
        black_box(&buf);
    })
}

/// Times the broker parsing a publish body and taking its payload.
fn bench_decode_publish(b: &mut Bencher<'_>, body: &[u8]) {
    b.iter(|| {
        black_box(
            InboundFrame::parse(body)
                .unwrap()
                .publish_payload()
                .unwrap(),
        )
    })
}

fn client_frames(c: &mut Criterion) {
    let mut group = c.benchmark_group("client frames");
    for size in [100usize, 16 * 1024] {
        let payload = "x".repeat(size);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(
            BenchmarkId::new("encode publish", size),
            &payload,
            |b, payload| {
                bench_encode(b, size + 64, |buf| {
                    ClientFrame::Publish { payload }.encode(buf)
                })
            },
        );
        let canonical = encoded(&ClientFrame::Publish { payload: &payload });
        group.bench_with_input(
            BenchmarkId::new("decode publish, canonical", size),
            &canonical,
            |b, body| bench_decode_publish(b, body),
        );
        let general = format!(r#"{{"payload": "{payload}", "type": "publish"}}"#).into_bytes();
        group.bench_with_input(
            BenchmarkId::new("decode publish, other spelling", size),
            &general,
            |b, body| bench_decode_publish(b, body),
        );
    }
    group.throughput(Throughput::Elements(1));
    let ack = encoded(&ClientFrame::Ack {
        id: MessageId(123_456_789),
    });
    group.bench_function("encode ack", |b| {
        bench_encode(b, 64, |buf| {
            ClientFrame::Ack {
                id: MessageId(123_456_789),
            }
            .encode(buf)
        })
    });
    group.bench_function("decode ack", |b| {
        b.iter(|| black_box(InboundFrame::parse(&ack).unwrap().ack_id().unwrap()))
    });
    let register = encoded(&ClientFrame::Register {
        role: Role::Consumer,
        queue: "orders",
        prefetch: Some(100),
        token: Some("secret"),
        version: None,
        ack_timeout_ms: None,
    });
    group.bench_function("decode register", |b| {
        b.iter(|| black_box(InboundFrame::parse(&register).unwrap().register().unwrap()))
    });
    group.finish();
}

fn server_frames(c: &mut Criterion) {
    let mut group = c.benchmark_group("server frames");
    for size in [100usize, 16 * 1024] {
        let payload = Payload::from_text(&"x".repeat(size));
        group.throughput(Throughput::Bytes(size as u64));
        let delivery = ServerFrame::Delivery {
            id: MessageId(42),
            payload: &payload,
            attempt: 1,
            details: None,
        };
        group.bench_with_input(
            BenchmarkId::new("encode message", size),
            &delivery,
            |b, delivery| bench_encode(b, size + 64, |buf| delivery.encode(buf)),
        );
        let mut buf = BytesMut::new();
        delivery.encode(&mut buf);
        let body = buf[4..].to_vec();
        group.bench_with_input(
            BenchmarkId::new("decode message", size),
            &body,
            |b, body| b.iter(|| black_box(ReceivedFrame::decode(body).unwrap())),
        );
    }
    group.throughput(Throughput::Elements(1));
    group.bench_function("encode ok with id", |b| {
        bench_encode(b, 64, |buf| {
            ServerFrame::Published(MessageId(123_456_789)).encode(buf)
        })
    });
    group.bench_function("decode ok with id", |b| {
        b.iter(|| black_box(ReceivedFrame::decode(br#"{"type":"ok","id":123456789}"#).unwrap()))
    });
    let error = ServerFrame::Error {
        code: ErrorCode::UnknownId,
        message: "message 7 is not in flight",
        id: Some(MessageId(7)),
    };
    group.bench_function("encode error", |b| {
        bench_encode(b, 128, |buf| error.encode(buf))
    });
    group.finish();
}

fn framing(c: &mut Criterion) {
    let mut group = c.benchmark_group("framing");
    let mut stream = BytesMut::new();
    for _ in 0..1000 {
        ClientFrame::Publish {
            payload: &"x".repeat(100),
        }
        .encode(&mut stream);
    }
    group.throughput(Throughput::Elements(1000));
    group.bench_function("split 1000 pipelined frames", |b| {
        b.iter(|| {
            let mut decoder = FrameDecoder::new(1 << 20);
            let mut buf = stream.clone();
            let mut frames = 0;
            while let Some(frame) = decoder.decode(&mut buf).unwrap() {
                frames += black_box(frame).len();
            }
            frames
        })
    });
    group.finish();
}

criterion_group!(benches, client_frames, server_frames, framing);
criterion_main!(benches);
