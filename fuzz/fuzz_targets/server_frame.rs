//! The client library's parser of broker frames on arbitrary bodies: it must never panic,
//! and what it decodes from a delivery must survive being encoded again.
#![no_main]

use bytes::BytesMut;
use ferry::protocol::server_frame::{ReceivedFrame, ServerFrame};
use ferry::protocol::Payload;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    if let Ok(ReceivedFrame::Message(message)) = ReceivedFrame::decode(body) {
        let payload = Payload::from_text(&message.payload);
        let mut buf = BytesMut::new();
        ServerFrame::Delivery { id: message.id, payload: &payload, attempt: message.attempt }.encode(&mut buf);
        assert_eq!(ReceivedFrame::decode(&buf[4..]).unwrap(), ReceivedFrame::Message(message));
    }
});
