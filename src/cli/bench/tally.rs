//! What one queue of a bench run confirmed and received: the basis of the lost and
//! duplicated counts and of when consumers may stop.
//!
//! A message is named by (producer within its queue, index), packed in its payload. Each
//! producer's received indices are a bitmap, so a duplicate is seen the moment it arrives.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};

use tokio_util::sync::CancellationToken;

pub struct QueueTally {
    confirmed: AtomicU64,
    producers_running: AtomicUsize,
    received: Mutex<Received>,
    /// Cancelled once every confirmed message of the queue has been received.
    pub complete: CancellationToken,
}

#[derive(Default)]
struct Received {
    /// Per producer, bit `i` says message `i` arrived.
    bitmaps: Vec<Vec<u64>>,
    unique: u64,
    duplicates: u64,
}

impl QueueTally {
    pub fn new(producers: usize) -> Self {
        QueueTally {
            confirmed: AtomicU64::new(0),
            producers_running: AtomicUsize::new(producers),
            received: Mutex::new(Received {
                bitmaps: vec![Vec::new(); producers],
                ..Received::default()
            }),
            complete: CancellationToken::new(),
        }
    }

    pub fn confirmed(&self, count: u64) {
        self.confirmed.fetch_add(count, SeqCst);
    }

    /// A producer has sent its last message and read its last confirm.
    pub fn producer_finished(&self) {
        self.producers_running.fetch_sub(1, SeqCst);
        self.check_complete(self.unique_received());
    }

    /// Records a delivery; false if it was a duplicate.
    pub fn received(&self, producer: usize, index: u64) -> bool {
        let (fresh, unique) = {
            let mut received = self.received.lock().unwrap_or_else(|e| e.into_inner());
            let bitmap = &mut received.bitmaps[producer];
            let (word, bit) = ((index / 64) as usize, index % 64);
            if bitmap.len() <= word {
                bitmap.resize(word + 1, 0);
            }
            let fresh = bitmap[word] & (1 << bit) == 0;
            bitmap[word] |= 1 << bit;
            if fresh {
                received.unique += 1;
            } else {
                received.duplicates += 1;
            }
            (fresh, received.unique)
        };
        self.check_complete(unique);
        fresh
    }

    pub fn unique_received(&self) -> u64 {
        self.received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unique
    }

    pub fn duplicates(&self) -> u64 {
        self.received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .duplicates
    }

    /// Confirmed messages never received, given which indices each producer had
    /// confirmed.
    pub fn lost(&self, confirmed_by_producer: &[Vec<u64>]) -> u64 {
        let received = self.received.lock().unwrap_or_else(|e| e.into_inner());
        confirmed_by_producer
            .iter()
            .zip(&received.bitmaps)
            .map(|(confirmed, bitmap)| {
                confirmed
                    .iter()
                    .filter(|&&i| {
                        bitmap
                            .get((i / 64) as usize)
                            .is_none_or(|w| w & (1 << (i % 64)) == 0)
                    })
                    .count() as u64
            })
            .sum()
    }

    /// Completes the queue if every producer is done and `unique` deliveries cover what
    /// was confirmed.
    fn check_complete(&self, unique: u64) {
        if self.producers_running.load(SeqCst) == 0 && unique >= self.confirmed.load(SeqCst) {
            self.complete.cancel();
        }
    }
}

/// The payload of bench message `index` of `producer`, sent at `sent_ns`, padded with
/// `padding` to its length: `producer:index:sent_ns:xxxx…`.
pub fn encode_payload(buf: &mut String, producer: usize, index: u64, sent_ns: u64, padding: &str) {
    buf.clear();
    let mut digits = itoa::Buffer::new();
    for field in [producer as u64, index, sent_ns] {
        buf.push_str(digits.format(field));
        buf.push(':');
    }
    if let Some(rest) = padding.get(buf.len()..) {
        buf.push_str(rest);
    }
}

/// (producer, index, sent_ns) of a bench payload, read in one pass.
pub fn decode_payload(payload: &str) -> Option<(usize, u64, u64)> {
    let mut fields = [0u64; 3];
    let mut field = 0;
    let mut digits = 0;
    for &byte in payload.as_bytes() {
        match byte {
            b'0'..=b'9' => {
                fields[field] = fields[field]
                    .checked_mul(10)?
                    .checked_add(u64::from(byte - b'0'))?;
                digits += 1;
            }
            b':' if digits > 0 => {
                field += 1;
                digits = 0;
                if field == fields.len() {
                    let [producer, index, sent_ns] = fields;
                    return Some((usize::try_from(producer).ok()?, index, sent_ns));
                }
            }
            _ => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_pad() {
        let mut buf = String::new();
        encode_payload(&mut buf, 3, 123_456, 987_654_321, &"x".repeat(100));
        assert_eq!(buf.len(), 100);
        assert_eq!(decode_payload(&buf), Some((3, 123_456, 987_654_321)));
        encode_payload(&mut buf, 0, 0, 0, "x");
        assert_eq!(
            decode_payload(&buf),
            Some((0, 0, 0)),
            "a size below the header is not truncated"
        );
        for not_ours in [
            "x:1:2:pad",
            "1:2:",
            ":1:2:",
            "1:2:3",
            "18446744073709551616:0:0:",
        ] {
            assert_eq!(decode_payload(not_ours), None, "{not_ours}");
        }
    }

    #[test]
    fn the_tally_counts_duplicates_and_losses_and_completes() {
        let tally = QueueTally::new(2);
        tally.confirmed(3);
        assert!(tally.received(0, 0));
        assert!(tally.received(1, 200));
        assert!(!tally.received(0, 0));
        assert_eq!((tally.unique_received(), tally.duplicates()), (2, 1));
        assert_eq!(tally.lost(&[vec![0, 1], vec![200]]), 1);
        tally.producer_finished();
        tally.producer_finished();
        assert!(
            !tally.complete.is_cancelled(),
            "one confirmed message is missing"
        );
        assert!(tally.received(0, 1));
        assert!(tally.complete.is_cancelled());
    }
}
