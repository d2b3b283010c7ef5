//! Records kept beside some messages, by id: a dead letter's record, a publish's
//! attributes. Most messages have none, so they are kept aside rather than in a field
//! every message would pay for, and a table that is empty spares every lookup. Each
//! record is counted against the memory limit while it is kept.

use std::sync::Arc;

use rustc_hash::FxHashMap;

use crate::protocol::MessageId;

/// What a record costs against the memory limit.
pub trait Costed {
    fn cost(&self) -> u64;
}

#[derive(Debug)]
pub struct SideTable<T> {
    by_id: FxHashMap<MessageId, Arc<T>>,
}

impl<T> Default for SideTable<T> {
    fn default() -> Self {
        SideTable {
            by_id: FxHashMap::default(),
        }
    }
}

impl<T: Costed> SideTable<T> {
    /// Keeps `record` for message `id`; returns the one it replaces.
    pub fn insert(
        &mut self,
        id: MessageId,
        record: Arc<T>,
        memory_bytes: &mut u64,
    ) -> Option<Arc<T>> {
        *memory_bytes += record.cost();
        let replaced = self.by_id.insert(id, record);
        if let Some(replaced) = &replaced {
            *memory_bytes -= replaced.cost();
        }
        replaced
    }

    /// Takes message `id`'s record away, if it has one (it is leaving).
    #[inline]
    pub fn remove(&mut self, id: MessageId, memory_bytes: &mut u64) -> Option<Arc<T>> {
        if self.by_id.is_empty() {
            return None;
        }
        let removed = self.by_id.remove(&id);
        if let Some(removed) = &removed {
            *memory_bytes -= removed.cost();
        }
        removed
    }

    /// Message `id`'s record, shared.
    #[inline]
    pub fn get(&self, id: MessageId) -> Option<Arc<T>> {
        self.get_ref(id).cloned()
    }

    #[inline]
    pub fn get_ref(&self, id: MessageId) -> Option<&Arc<T>> {
        if self.by_id.is_empty() {
            return None;
        }
        self.by_id.get(&id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Costed for u64 {
        fn cost(&self) -> u64 {
            *self
        }
    }

    #[test]
    fn memory_follows_what_is_kept() {
        let mut table = SideTable::default();
        let mut memory = 0;
        assert_eq!(
            table.insert(MessageId(1), Arc::new(10u64), &mut memory),
            None
        );
        assert_eq!(
            table.insert(MessageId(2), Arc::new(5u64), &mut memory),
            None
        );
        assert_eq!(memory, 15);
        let replaced = table.insert(MessageId(1), Arc::new(7u64), &mut memory);
        assert_eq!((replaced, memory), (Some(Arc::new(10)), 12));
        assert_eq!(table.get(MessageId(1)), Some(Arc::new(7)));
        assert_eq!(table.remove(MessageId(3), &mut memory), None);
        assert_eq!(table.remove(MessageId(1), &mut memory), Some(Arc::new(7)));
        assert_eq!(table.remove(MessageId(2), &mut memory), Some(Arc::new(5)));
        assert_eq!((memory, table.get(MessageId(2))), (0, None));
    }
}
