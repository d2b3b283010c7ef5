//! A queue's ready messages in delivery order (rule 10): highest priority first, and
//! within a priority first in, first out, returns at the front.
//!
//! One FIFO per priority in use, kept in a short list from the highest priority down,
//! with a bit per FIFO that holds anything: finding the next message is one count of
//! trailing zeros however many priorities are in use (and the message a full queue drops
//! under `drop-head`, rule 17, one count of leading zeros), and a queue whose messages all
//! have one priority holds one FIFO. A level is made the first time its priority is used
//! and kept after that (emptied, it keeps its last chunk, which is counted), so a queue
//! that alternates between priorities does not allocate for it each time. A queue has at
//! most ten levels: the core clamps priorities to 0-9.

use super::chunked_deque::ChunkedDeque;

/// What a ready queue holds: something with a priority.
pub trait Prioritized {
    fn priority(&self) -> u8;
}

#[derive(Debug)]
pub struct ReadyQueue<T> {
    /// The highest priority in use, kept in the queue itself: a queue of one priority
    /// reaches its FIFO without going through the list.
    first: Option<Level<T>>,
    /// The lower priorities in use, highest first; no two share a priority.
    rest: Vec<Level<T>>,
    /// Bit 0 is set when `first` holds a message, bit `i` when `rest[i - 1]` does.
    non_empty: u16,
    /// Room in the chunks of every level, kept as they change: the core asks after
    /// every push and pop, to count what the queue costs.
    capacity: usize,
    /// Messages held, over every level: a queue's length limit (rule 17) counts them.
    len: usize,
}

#[derive(Debug)]
struct Level<T> {
    priority: u8,
    messages: ChunkedDeque<T>,
}

impl<T> Level<T> {
    fn new(priority: u8) -> Level<T> {
        Level {
            priority,
            messages: ChunkedDeque::default(),
        }
    }
}

impl<T> Default for ReadyQueue<T> {
    fn default() -> Self {
        ReadyQueue {
            first: None,
            rest: Vec::new(),
            non_empty: 0,
            capacity: 0,
            len: 0,
        }
    }
}

impl<T: Prioritized> ReadyQueue<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.non_empty == 0
    }

    /// Priorities used so far, each with its level.
    pub fn level_count(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.len()
    }

    /// Elements the chunks of every level have room for.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The next message to deliver.
    #[inline]
    pub fn front(&self) -> Option<&T> {
        match self.non_empty.trailing_zeros() as usize {
            0 => self.first.as_ref()?.messages.front(),
            index => self.rest.get(index - 1)?.messages.front(),
        }
    }

    #[inline]
    pub fn pop_front(&mut self) -> Option<T> {
        self.pop_at(self.non_empty.trailing_zeros() as usize)
    }

    /// Takes the oldest message of the lowest priority that holds any: what a queue at
    /// its length limit drops under `drop-head` (rule 17).
    pub fn pop_lowest(&mut self) -> Option<T> {
        let index = u16::BITS.checked_sub(1 + self.non_empty.leading_zeros())?;
        self.pop_at(index as usize)
    }

    /// Takes the front of the level at place `index` (as `non_empty` counts them).
    #[inline]
    fn pop_at(&mut self, index: usize) -> Option<T> {
        let level = match index {
            0 => &mut self.first.as_mut()?.messages,
            index => &mut self.rest.get_mut(index - 1)?.messages,
        };
        let room = level.capacity();
        let message = level.pop_front()?;
        self.capacity -= room - level.capacity();
        self.len -= 1;
        if level.is_empty() {
            self.non_empty &= !(1 << index);
        }
        Some(message)
    }

    /// Appends a message behind the others of its priority.
    #[inline]
    pub fn push_back(&mut self, message: T) {
        self.push(message, ChunkedDeque::push_back);
    }

    /// Puts a message ahead of the others of its priority.
    #[inline]
    pub fn push_front(&mut self, message: T) {
        self.push(message, ChunkedDeque::push_front);
    }

    #[inline]
    fn push(&mut self, message: T, push: impl FnOnce(&mut ChunkedDeque<T>, T)) {
        let priority = message.priority();
        let (index, level) = match &mut self.first {
            Some(first) if first.priority == priority => (0, &mut first.messages),
            _ => self.level(priority),
        };
        let room = level.capacity();
        push(level, message);
        self.capacity += level.capacity() - room;
        self.len += 1;
        self.non_empty |= 1 << index;
    }

    /// Every message, in delivery order.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.levels().flat_map(|l| l.messages.iter())
    }

    fn levels(&self) -> impl Iterator<Item = &Level<T>> {
        self.first.iter().chain(&self.rest)
    }

    /// The place (as `non_empty` counts it) and the FIFO of `priority`, made if new.
    fn level(&mut self, priority: u8) -> (usize, &mut ChunkedDeque<T>) {
        debug_assert!(
            self.level_count() < 10 || self.levels().any(|l| l.priority == priority),
            "at most ten priorities"
        );
        match &self.first {
            None => {
                let first = self.first.insert(Level::new(priority));
                return (0, &mut first.messages);
            }
            Some(first) if priority > first.priority => {
                // A new highest priority: the old first leads the rest, and every bit
                // moves up.
                let old = self.first.take();
                self.rest.splice(0..0, old);
                self.non_empty <<= 1;
                let first = self.first.insert(Level::new(priority));
                return (0, &mut first.messages);
            }
            Some(_) => {}
        }
        let index = match self.rest.iter().position(|l| l.priority <= priority) {
            Some(index) if self.rest[index].priority == priority => index,
            place => {
                let index = place.unwrap_or(self.rest.len());
                self.rest.insert(index, Level::new(priority));
                // The levels from this one on moved up by one: so do their bits.
                let below = self.non_empty & ((1 << (index + 1)) - 1);
                self.non_empty = below | ((self.non_empty & !below) << 1);
                index
            }
        };
        (index + 1, &mut self.rest[index].messages)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use proptest::prelude::*;

    use super::*;

    /// (priority, serial)
    type Item = (u8, u32);

    impl Prioritized for Item {
        fn priority(&self) -> u8 {
            self.0
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        PushBack(Item),
        PushFront(Item),
        PopFront,
        PopLowest,
    }

    fn op() -> impl Strategy<Value = Op> {
        let item = (0u8..10, any::<u32>());
        prop_oneof![
            3 => item.clone().prop_map(Op::PushBack),
            1 => item.prop_map(Op::PushFront),
            2 => Just(Op::PopFront),
            1 => Just(Op::PopLowest),
        ]
    }

    /// Messages held, counted level by level.
    fn levels_len(queue: &ReadyQueue<Item>) -> usize {
        queue.levels().map(|l| l.messages.len()).sum()
    }

    /// The reference: one FIFO per priority 0-9, the highest non-empty first.
    fn reference_front(reference: &[VecDeque<Item>; 10]) -> Option<&Item> {
        reference.iter().rev().find_map(|fifo| fifo.front())
    }

    proptest! {
        #[test]
        fn delivers_highest_priority_first_fifo_within(
            priorities in 1u8..=10,
            ops in prop::collection::vec(op(), 0..1500),
        ) {
            let mut queue = ReadyQueue::default();
            let mut reference: [VecDeque<Item>; 10] = Default::default();
            for op in ops {
                match op {
                    Op::PushBack(item) => {
                        let item = (item.0 % priorities, item.1);
                        queue.push_back(item);
                        reference[usize::from(item.0)].push_back(item);
                    }
                    Op::PushFront(item) => {
                        let item = (item.0 % priorities, item.1);
                        queue.push_front(item);
                        reference[usize::from(item.0)].push_front(item);
                    }
                    Op::PopFront => {
                        let expected = reference.iter_mut().rev().find_map(|fifo| fifo.pop_front());
                        prop_assert_eq!(queue.pop_front(), expected);
                    }
                    Op::PopLowest => {
                        let expected = reference.iter_mut().find_map(|fifo| fifo.pop_front());
                        prop_assert_eq!(queue.pop_lowest(), expected);
                    }
                }
                prop_assert_eq!(queue.len(), reference.iter().map(VecDeque::len).sum::<usize>());
                prop_assert_eq!(queue.len(), levels_len(&queue));
                prop_assert_eq!(queue.front(), reference_front(&reference));
                let levels: Vec<&Level<Item>> = queue.levels().collect();
                prop_assert!(levels.windows(2).all(|w| w[0].priority > w[1].priority));
                prop_assert_eq!(queue.capacity(), levels.iter().map(|l| l.messages.capacity()).sum::<usize>());
                for (index, level) in levels.iter().enumerate() {
                    prop_assert_eq!(queue.non_empty & (1 << index) != 0, !level.messages.is_empty());
                }
                prop_assert_eq!(queue.non_empty >> levels.len(), 0);
                prop_assert!(levels.len() <= usize::from(priorities));
            }
            prop_assert!(queue.iter().eq(reference.iter().rev().flatten()));
        }
    }

    #[test]
    fn one_priority_in_use_is_one_level() {
        let mut queue = ReadyQueue::default();
        for serial in 0..1000 {
            queue.push_back((4, serial));
        }
        assert_eq!(queue.level_count(), 1);
        assert!(queue.rest.is_empty(), "kept in the queue itself");
        assert_eq!(queue.pop_front(), Some((4, 0)));
    }
}
