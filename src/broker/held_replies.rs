//! Replies that wait for the log: a publish may be confirmed only once its record is
//! durable, so a producer's replies are held, in order, until the batch they belong to is
//! announced durable. Once a connection has replies held, its later replies queue behind
//! them, even those that need nothing durable, so its reply order is kept.

use std::collections::VecDeque;

use rustc_hash::FxHashMap;

use super::commands::{ConnectionId, Reply};

#[derive(Default)]
pub(crate) struct HeldReplies {
    /// (batch sequence number, connection, replies), in the order they were produced.
    queue: VecDeque<(u64, ConnectionId, Vec<Reply>)>,
    held_per_connection: FxHashMap<ConnectionId, usize>,
}

impl HeldReplies {
    /// Whether this connection has replies waiting, so its next ones must wait too.
    pub fn holds_for(&self, conn: ConnectionId) -> bool {
        self.held_per_connection.contains_key(&conn)
    }

    pub fn hold(&mut self, seq: u64, conn: ConnectionId, replies: Vec<Reply>) {
        *self.held_per_connection.entry(conn).or_default() += 1;
        self.queue.push_back((seq, conn, replies));
    }

    /// Takes every held reply batch whose sequence number is at most `durable`, in order.
    pub fn release_through(&mut self, durable: u64) -> Vec<(ConnectionId, Vec<Reply>)> {
        let mut released = Vec::new();
        while self
            .queue
            .front()
            .is_some_and(|(seq, _, _)| *seq <= durable)
        {
            let (_, conn, replies) = self.queue.pop_front().expect("the front was just seen");
            if let Some(count) = self.held_per_connection.get_mut(&conn) {
                *count -= 1;
                if *count == 0 {
                    self.held_per_connection.remove(&conn);
                }
            }
            released.push((conn, replies));
        }
        released
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::MessageId;

    #[test]
    fn releases_in_order_up_to_the_durable_batch_and_forgets_connections() {
        let mut held = HeldReplies::default();
        let (a, b) = (ConnectionId(1), ConnectionId(2));
        held.hold(1, a, vec![Reply::Published(MessageId(1))]);
        held.hold(2, b, vec![Reply::Published(MessageId(2))]);
        held.hold(2, a, vec![Reply::Published(MessageId(3))]);
        held.hold(3, a, vec![]);
        assert!(held.holds_for(a) && held.holds_for(b));
        let released: Vec<_> = held
            .release_through(2)
            .into_iter()
            .map(|(conn, _)| conn)
            .collect();
        assert_eq!(released, [a, b, a]);
        assert!(!held.holds_for(b));
        assert!(held.holds_for(a), "one batch of a's is still waiting");
        assert_eq!(held.release_through(2).len(), 0);
        assert_eq!(held.release_through(3).len(), 1);
        assert!(held.is_empty() && !held.holds_for(a));
    }
}
