//! The broker's parser of client frames on arbitrary bodies: it must never panic, and its
//! canonical fast path must agree with the general JSON parser on everything it accepts.
#![no_main]

use ferry::protocol::client_frame::{FrameType, InboundFrame};
use libfuzzer_sys::fuzz_target;

fn summary(frame: &InboundFrame<'_>) -> (FrameType, String) {
    let detail = match frame.frame_type() {
        FrameType::Register => format!("{:?}", frame.register()),
        FrameType::Publish => format!("{:?}", frame.publish_payload().map_err(|e| e.to_string())),
        FrameType::Ack => format!("{:?}", frame.ack_id().map_err(|e| e.to_string())),
    };
    (frame.frame_type(), detail)
}

fuzz_target!(|body: &[u8]| {
    let fast = InboundFrame::parse(body);
    let general = InboundFrame::parse_general(body);
    match (&fast, &general) {
        (Ok(fast), Ok(general)) => {
            let (fast, general) = (summary(fast), summary(general));
            // The fast path takes only valid frames; their meaning must match.
            if !fast.1.contains("Err") {
                assert_eq!(fast, general);
            }
        }
        (Ok(fast), Err(e)) => panic!("fast path accepted {:?}, the parser said {e}", summary(fast)),
        (Err(_), _) => {}
    }
});
