//! A double-ended queue stored in fixed-size chunks, for queues that may grow to tens of
//! millions of messages. A `VecDeque` grows by doubling and copies every element when it
//! does: one publish into a deep backlog then stalls the whole broker for as long as that
//! copy takes. Here growth adds a chunk; the only thing ever copied is the spine of chunk
//! pointers, 8 bytes per [`CHUNK_LEN`] elements. Every other operation costs O(1),
//! amortised over at most one chunk.
//!
//! A small queue stays small: a new deque's first chunk starts with room for a few
//! elements and grows to [`CHUNK_LEN`] as needed. An emptied chunk is freed, except the
//! last one, so that a queue that keeps going empty and filling again does not allocate
//! each time. [`ChunkedDeque::capacity`] says how many elements the chunks have room for,
//! so that what they cost can be counted.

use std::collections::VecDeque;

/// Elements per chunk: large enough that the spine stays short and allocations rare,
/// small enough that a queue's partly used chunks at each end cost little.
pub const CHUNK_LEN: usize = 64;

/// Room a new deque's first chunk starts with.
const FIRST_CHUNK_LEN: usize = 4;

/// A chunk, boxed so that the spine holds 8-byte pointers rather than 32-byte deques: the
/// spine is what a deep backlog's growth copies.
#[allow(clippy::box_collection)]
type Chunk<T> = Box<VecDeque<T>>;

#[derive(Debug)]
pub struct ChunkedDeque<T> {
    /// Never holds an empty chunk except as its only one; no chunk holds more than
    /// [`CHUNK_LEN`] elements.
    chunks: VecDeque<Chunk<T>>,
    len: usize,
    /// Room in all chunks together.
    capacity: usize,
}

impl<T> Default for ChunkedDeque<T> {
    fn default() -> Self {
        ChunkedDeque {
            chunks: VecDeque::new(),
            len: 0,
            capacity: 0,
        }
    }
}

impl<T> ChunkedDeque<T> {
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Elements the allocated chunks have room for.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn front(&self) -> Option<&T> {
        self.chunks.front().and_then(|chunk| chunk.front())
    }

    #[inline]
    pub fn push_back(&mut self, value: T) {
        match self.chunks.back_mut() {
            Some(last) if last.len() < CHUNK_LEN => {
                let room = last.capacity();
                last.push_back(value);
                self.capacity += last.capacity() - room;
            }
            _ => {
                let mut chunk = self.new_chunk();
                chunk.push_back(value);
                self.capacity += chunk.capacity();
                self.chunks.push_back(chunk);
            }
        }
        self.len += 1;
    }

    #[inline]
    pub fn push_front(&mut self, value: T) {
        match self.chunks.front_mut() {
            Some(first) if first.len() < CHUNK_LEN => {
                let room = first.capacity();
                first.push_front(value);
                self.capacity += first.capacity() - room;
            }
            _ => {
                let mut chunk = self.new_chunk();
                chunk.push_front(value);
                self.capacity += chunk.capacity();
                self.chunks.push_front(chunk);
            }
        }
        self.len += 1;
    }

    #[inline]
    pub fn pop_front(&mut self) -> Option<T> {
        let more_chunks = self.chunks.len() > 1;
        let first = self.chunks.front_mut()?;
        let value = first.pop_front()?;
        if first.is_empty() && more_chunks {
            self.capacity -= first.capacity();
            self.chunks.pop_front();
        }
        self.len -= 1;
        Some(value)
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.chunks.iter().flat_map(|chunk| chunk.iter())
    }

    /// A chunk with room for a full chunk, or for a few elements when the deque holds
    /// nothing yet (most queues are short).
    fn new_chunk(&self) -> Chunk<T> {
        let capacity = if self.chunks.is_empty() {
            FIRST_CHUNK_LEN
        } else {
            CHUNK_LEN
        };
        Box::new(VecDeque::with_capacity(capacity))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        PushBack(u32),
        PushFront(u32),
        PopFront,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => any::<u32>().prop_map(Op::PushBack),
            1 => any::<u32>().prop_map(Op::PushFront),
            2 => Just(Op::PopFront),
        ]
    }

    proptest! {
        #[test]
        fn behaves_as_a_vecdeque(ops in prop::collection::vec(op(), 0..2000)) {
            let mut chunked = ChunkedDeque::default();
            let mut reference = VecDeque::new();
            for op in ops {
                match op {
                    Op::PushBack(v) => {
                        chunked.push_back(v);
                        reference.push_back(v);
                    }
                    Op::PushFront(v) => {
                        chunked.push_front(v);
                        reference.push_front(v);
                    }
                    Op::PopFront => prop_assert_eq!(chunked.pop_front(), reference.pop_front()),
                }
                prop_assert_eq!(chunked.len(), reference.len());
                prop_assert_eq!(chunked.front(), reference.front());
                prop_assert!(chunked.chunks.iter().all(|c| c.len() <= CHUNK_LEN));
                prop_assert_eq!(chunked.capacity(), chunked.chunks.iter().map(|c| c.capacity()).sum::<usize>());
                prop_assert!(chunked.capacity() <= (chunked.len() / CHUNK_LEN + 2) * CHUNK_LEN);
                prop_assert!(chunked.chunks.len() <= 1 || chunked.chunks.iter().all(|c| !c.is_empty()));
            }
            prop_assert!(chunked.iter().eq(reference.iter()));
        }
    }

    #[test]
    fn growth_never_moves_an_element() {
        let mut deque = ChunkedDeque::default();
        for value in 0..100 * CHUNK_LEN {
            deque.push_back(value);
        }
        let first = deque.front().unwrap() as *const usize;
        for value in 0..100 * CHUNK_LEN {
            deque.push_back(value);
        }
        assert_eq!(first, deque.front().unwrap() as *const usize);
    }
}
