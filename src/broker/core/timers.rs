//! The core's timers: a hierarchical timing wheel (as in tokio's timer, and Varghese and
//! Lauck's paper) whose entries sit in a slab, linked into the slot they fall in.
//!
//! Why not a sorted FIFO or a heap: an ack must take its deadline away at once, or the
//! deadlines of acked messages pile up behind one that is not acked (for a whole ack
//! timeout, at any delivery rate); and deadlines are not in insertion order once leases
//! differ. Here insert, cancel and expiry each cost O(1) (an entry moves down at most
//! [`LEVELS`] − 1 times before it fires), and memory is one slab entry per live timer:
//! the slab hands out its lowest free entries first and lets go of chunks at its end
//! once they are empty.
//!
//! Time is counted in ticks of 2^20 ns (about a millisecond) from the first instant the
//! wheel is given. An entry keeps its exact instant: [`TimerWheel::advance`] fires exactly
//! the entries due at or before `now`, and [`TimerWheel::next_deadline`] is never more
//! than a tick after the earliest one (sooner when entries must move down a level).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// Bits of a slot index: 64 slots per level.
const SLOT_BITS: u32 = 6;
const SLOTS: usize = 1 << SLOT_BITS;
/// Levels of the wheel: 64^6 ticks of ~1 ms, about two years, before an entry is held in
/// the top level's slots round after round.
pub const LEVELS: usize = 6;
/// A tick is 2^TICK_SHIFT nanoseconds.
const TICK_SHIFT: u32 = 20;
/// Ticks the wheel spans; entries further away wait in the top level.
const SPAN_TICKS: u64 = 1 << (SLOT_BITS as usize * LEVELS);
/// No entry: the end of a slot's list.
const NIL: u32 = u32::MAX;

/// The length of a tick: the most [`TimerWheel::next_deadline`] may lie after the
/// earliest deadline.
pub const TICK: Duration = Duration::from_nanos(1 << TICK_SHIFT);

/// Names a timer, to cancel it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerKey(u32);

#[derive(Debug)]
pub struct TimerWheel<T> {
    /// Tick 0; set by the first instant the wheel sees.
    origin: Option<Instant>,
    /// The tick up to which every slot has been processed.
    elapsed: u64,
    levels: [Level; LEVELS],
    entries: Slab<Entry<T>>,
    /// The last instant converted to nanoseconds, and what it came to: the deliveries of
    /// one turn share their deadline.
    last_converted: Option<(Instant, u64)>,
}

#[derive(Debug, Clone, Copy)]
struct Level {
    /// Bit `s` is set when slot `s` holds an entry.
    occupied: u64,
    heads: [u32; SLOTS],
}

#[derive(Debug)]
struct Entry<T> {
    value: T,
    /// Nanoseconds from the origin.
    at: u64,
    prev: u32,
    next: u32,
    level: u8,
    slot: u8,
}

/// The next slot to process: its level, index, and the tick at which it is due.
#[derive(Debug, Clone, Copy)]
struct Expiration {
    level: usize,
    slot: usize,
    tick: u64,
}

impl<T> Default for TimerWheel<T> {
    fn default() -> Self {
        TimerWheel {
            origin: None,
            elapsed: 0,
            levels: [Level {
                occupied: 0,
                heads: [NIL; SLOTS],
            }; LEVELS],
            entries: Slab::default(),
            last_converted: None,
        }
    }
}

impl<T> TimerWheel<T> {
    /// Timers held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// What one timer costs in the slab.
    pub const ENTRY_BYTES: usize = std::mem::size_of::<Option<Entry<T>>>();

    /// The values of every timer held, in no particular order.
    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.entries
            .chunks
            .iter()
            .flat_map(|chunk| chunk.slots.iter().flatten().map(|entry| &entry.value))
    }

    /// Slab entries allocated, live or free: what the timers cost in memory.
    #[cfg(test)]
    pub fn allocated(&self) -> usize {
        self.entries.allocated()
    }

    /// Adds a timer due at `at`, which must not be before the latest `now` given to
    /// [`TimerWheel::advance`].
    #[inline]
    pub fn insert(&mut self, at: Instant, value: T) -> TimerKey {
        let at = self.nanos(at);
        let key = self.entries.insert(Entry {
            value,
            at,
            prev: NIL,
            next: NIL,
            level: 0,
            slot: 0,
        });
        self.link(key);
        TimerKey(key)
    }

    /// Cancels a timer and returns its value.
    ///
    /// # Panics
    /// If `key` names no live timer (a caller bug: keys are used once).
    pub fn remove(&mut self, key: TimerKey) -> T {
        self.unlink(key.0);
        self.entries.remove(key.0).value
    }

    /// Fires every timer due at or before `now`, handing each value to `fire`.
    pub fn advance(&mut self, now: Instant, mut fire: impl FnMut(T)) {
        let now_nanos = self.nanos(now);
        let now_tick = now_nanos >> TICK_SHIFT;
        while let Some(next) = self.next_expiration() {
            if next.tick > now_tick {
                break;
            }
            if next.level == 0 && next.tick == now_tick {
                // The current tick: only what is due by now fires; the rest waits.
                let mut at = self.levels[0].heads[next.slot];
                while at != NIL {
                    let entry = &self.entries[at];
                    let (due, following) = (entry.at <= now_nanos, entry.next);
                    if due {
                        self.unlink(at);
                        fire(self.entries.remove(at).value);
                    }
                    at = following;
                }
                break;
            }
            self.elapsed = next.tick;
            let mut at = self.take_slot(next.level, next.slot);
            while at != NIL {
                let following = self.entries[at].next;
                if next.level == 0 {
                    // A past tick: everything in it is due.
                    fire(self.entries.remove(at).value);
                } else {
                    // Down to the level its distance now calls for.
                    self.link(at);
                }
                at = following;
            }
        }
        self.elapsed = self.elapsed.max(now_tick);
    }

    /// When [`TimerWheel::advance`] must next be called: the end of the tick of the
    /// earliest timer, or sooner, when timers must move down a level first.
    pub fn next_deadline(&self) -> Option<Instant> {
        let next = self.next_expiration()?;
        let tick = if next.level == 0 {
            next.tick + 1
        } else {
            next.tick
        };
        Some(self.origin? + Duration::from_nanos(tick << TICK_SHIFT))
    }

    /// Nanoseconds from the origin (set by the first call).
    fn nanos(&mut self, at: Instant) -> u64 {
        if let Some((last, nanos)) = self.last_converted
            && last == at
        {
            return nanos;
        }
        let origin = *self.origin.get_or_insert(at);
        let nanos =
            u64::try_from(at.saturating_duration_since(origin).as_nanos()).unwrap_or(u64::MAX);
        self.last_converted = Some((at, nanos));
        nanos
    }

    /// Puts an unlinked entry at the head of the slot its distance from `elapsed` calls for.
    fn link(&mut self, key: u32) {
        let tick = (self.entries[key].at >> TICK_SHIFT).max(self.elapsed);
        // Beyond the wheel's span: held at the farthest place, and placed again from
        // there when that comes up.
        let tick = tick.min(self.elapsed + SPAN_TICKS - 1);
        let level = level_of(self.elapsed, tick);
        let slot = ((tick >> (SLOT_BITS as usize * level)) as usize) & (SLOTS - 1);
        let head = self.levels[level].heads[slot];
        if head != NIL {
            self.entries[head].prev = key;
        }
        let entry = &mut self.entries[key];
        entry.prev = NIL;
        entry.next = head;
        entry.level = level as u8;
        entry.slot = slot as u8;
        self.levels[level].heads[slot] = key;
        self.levels[level].occupied |= 1 << slot;
    }

    fn unlink(&mut self, key: u32) {
        let Entry {
            prev,
            next,
            level,
            slot,
            ..
        } = self.entries[key];
        if prev == NIL {
            let level = &mut self.levels[usize::from(level)];
            level.heads[usize::from(slot)] = next;
            if next == NIL {
                level.occupied &= !(1 << slot);
            }
        } else {
            self.entries[prev].next = next;
        }
        if next != NIL {
            self.entries[next].prev = prev;
        }
    }

    /// Empties a slot and returns the first entry of its list.
    fn take_slot(&mut self, level: usize, slot: usize) -> u32 {
        let level = &mut self.levels[level];
        level.occupied &= !(1 << slot);
        std::mem::replace(&mut level.heads[slot], NIL)
    }

    /// The occupied slot to process first. Entries sit at the level of the highest bit in
    /// which their tick differs from `elapsed`, so every entry of a lower level is due
    /// before any of a higher one: the first occupied level holds it.
    fn next_expiration(&self) -> Option<Expiration> {
        let level = self.levels.iter().position(|level| level.occupied != 0)?;
        let shift = SLOT_BITS as usize * level;
        // Below the top, an entry's slot is never the one `elapsed` is in (it would be a
        // level lower). In the top level, whose slots take turns, an entry in that slot
        // is a whole turn ahead: it comes last.
        let first =
            ((self.elapsed >> shift) as usize + usize::from(level == LEVELS - 1)) & (SLOTS - 1);
        let rotated = self.levels[level].occupied.rotate_right(first as u32);
        let slot = (rotated.trailing_zeros() as usize + first) & (SLOTS - 1);
        let level_span = 1u64 << (shift + SLOT_BITS as usize);
        let mut tick = (self.elapsed & !(level_span - 1)) + ((slot as u64) << shift);
        if tick < self.elapsed || (level == LEVELS - 1 && tick == self.elapsed) {
            debug_assert_eq!(level, LEVELS - 1, "only the top level wraps");
            tick += level_span;
        }
        Some(Expiration { level, slot, tick })
    }
}

/// The level for a tick seen from `elapsed`: that of the highest 6-bit group in which
/// they differ.
fn level_of(elapsed: u64, tick: u64) -> usize {
    let differing = (elapsed ^ tick) | (SLOTS as u64 - 1);
    let highest_bit = 63 - differing.leading_zeros() as usize;
    (highest_bit / SLOT_BITS as usize).min(LEVELS - 1)
}

/// Entries by index, in chunks that never move (growing copies no entry), handing out
/// the lowest free index first so that the last chunks empty out and can be let go. One
/// empty chunk is kept at the end, so that a count of timers that hovers around a chunk
/// boundary does not free and allocate a chunk each time it crosses it.
#[derive(Debug)]
struct Slab<E> {
    chunks: Vec<SlabChunk<E>>,
    /// Chunks with a free entry.
    with_room: BTreeSet<u32>,
    len: usize,
}

#[derive(Debug)]
struct SlabChunk<E> {
    slots: Vec<Option<E>>,
    free: Vec<u32>,
    live: usize,
}

/// Entries per slab chunk.
const SLAB_CHUNK: usize = 1024;

impl<E> Default for Slab<E> {
    fn default() -> Self {
        Slab {
            chunks: Vec::new(),
            with_room: BTreeSet::new(),
            len: 0,
        }
    }
}

impl<E> Slab<E> {
    fn len(&self) -> usize {
        self.len
    }

    #[cfg(test)]
    fn allocated(&self) -> usize {
        self.chunks.len() * SLAB_CHUNK
    }

    fn insert(&mut self, entry: E) -> u32 {
        let index = match self.with_room.first() {
            Some(&index) => index as usize,
            None => {
                self.chunks.push(SlabChunk {
                    slots: Vec::with_capacity(SLAB_CHUNK),
                    free: Vec::new(),
                    live: 0,
                });
                let index = self.chunks.len() - 1;
                self.with_room.insert(index as u32);
                index
            }
        };
        let chunk = &mut self.chunks[index];
        let offset = match chunk.free.pop() {
            Some(offset) => {
                chunk.slots[offset as usize] = Some(entry);
                offset as usize
            }
            None => {
                chunk.slots.push(Some(entry));
                chunk.slots.len() - 1
            }
        };
        chunk.live += 1;
        if chunk.live == SLAB_CHUNK {
            self.with_room.remove(&(index as u32));
        }
        self.len += 1;
        (index * SLAB_CHUNK + offset) as u32
    }

    fn remove(&mut self, key: u32) -> E {
        let (index, offset) = (key as usize / SLAB_CHUNK, key as usize % SLAB_CHUNK);
        let chunk = &mut self.chunks[index];
        let entry = chunk.slots[offset].take().expect("a live slab entry");
        if chunk.live == SLAB_CHUNK {
            self.with_room.insert(index as u32);
        }
        chunk.live -= 1;
        chunk.free.push(offset as u32);
        self.len -= 1;
        while self.chunks.len() >= 2
            && self.chunks[self.chunks.len() - 2..]
                .iter()
                .all(|chunk| chunk.live == 0)
        {
            self.chunks.pop();
            self.with_room.remove(&(self.chunks.len() as u32));
        }
        entry
    }
}

impl<E> std::ops::Index<u32> for Slab<E> {
    type Output = E;

    fn index(&self, key: u32) -> &E {
        let (index, offset) = (key as usize / SLAB_CHUNK, key as usize % SLAB_CHUNK);
        self.chunks[index].slots[offset]
            .as_ref()
            .expect("a live slab entry")
    }
}

impl<E> std::ops::IndexMut<u32> for Slab<E> {
    fn index_mut(&mut self, key: u32) -> &mut E {
        let (index, offset) = (key as usize / SLAB_CHUNK, key as usize % SLAB_CHUNK);
        self.chunks[index].slots[offset]
            .as_mut()
            .expect("a live slab entry")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn origin() -> Instant {
        static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *ORIGIN.get_or_init(Instant::now)
    }

    fn at(nanos: u64) -> Instant {
        origin() + Duration::from_nanos(nanos)
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// A timer this many nanoseconds after now.
        Insert(u64),
        /// Cancels the n-th live timer (modulo how many there are).
        Remove(usize),
        /// Moves now forward this many nanoseconds and fires what is due.
        Advance(u64),
        /// Moves now to the wheel's next deadline.
        AdvanceToNext,
    }

    fn distance() -> impl Strategy<Value = u64> {
        prop_oneof![
            0u64..(4 << TICK_SHIFT),
            0u64..(200 << TICK_SHIFT),
            0u64..(1 << 40),
            // Past the wheel's span.
            (SPAN_TICKS << TICK_SHIFT)..(SPAN_TICKS << (TICK_SHIFT + 1)),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => distance().prop_map(Op::Insert),
            2 => any::<usize>().prop_map(Op::Remove),
            2 => distance().prop_map(Op::Advance),
            2 => Just(Op::AdvanceToNext),
        ]
    }

    proptest! {
        /// Against a sorted map of (instant, id): the same timers fire, exactly when due,
        /// and the next deadline is never more than a tick late.
        #[test]
        fn fires_exactly_what_is_due(ops in prop::collection::vec(op(), 1..300)) {
            let mut wheel = TimerWheel::default();
            let mut model: BTreeMap<(u64, u64), TimerKey> = BTreeMap::new();
            let mut now = 0u64;
            let mut next_id = 0u64;
            wheel.advance(at(now), |_: u64| ());
            for op in ops {
                match op {
                    Op::Insert(after) => {
                        let due = now + after;
                        let key = wheel.insert(at(due), next_id);
                        model.insert((due, next_id), key);
                        next_id += 1;
                    }
                    Op::Remove(pick) => {
                        if let Some(&(due, id)) = model.keys().nth(pick % model.len().max(1)) {
                            let key = model.remove(&(due, id)).unwrap();
                            prop_assert_eq!(wheel.remove(key), id);
                        }
                    }
                    Op::Advance(by) => now += by,
                    Op::AdvanceToNext => {
                        if let Some(next) = wheel.next_deadline() {
                            now = now.max(u64::try_from((next - origin()).as_nanos()).unwrap());
                        }
                    }
                }
                if !matches!(op, Op::Insert(_) | Op::Remove(_)) {
                    let mut fired = Vec::new();
                    wheel.advance(at(now), |id| fired.push(id));
                    fired.sort_unstable();
                    let due: Vec<(u64, u64)> = model.range(..(now + 1, 0)).map(|(k, _)| *k).collect();
                    let mut expected: Vec<u64> = due.iter().map(|(_, id)| *id).collect();
                    expected.sort_unstable();
                    for key in due {
                        model.remove(&key);
                    }
                    prop_assert_eq!(fired, expected, "at {}", now);
                }
                prop_assert_eq!(wheel.len(), model.len());
                match (wheel.next_deadline(), model.keys().next()) {
                    (None, None) => {}
                    (Some(next), Some(&(earliest, _))) => {
                        prop_assert!(next <= at(earliest) + TICK, "next {:?} after earliest {} + a tick", next - origin(), earliest);
                    }
                    (next, earliest) => prop_assert!(false, "next {:?}, earliest {:?}", next, earliest),
                }
            }
        }
    }

    #[test]
    fn memory_follows_the_live_timers_not_the_cancelled_ones() {
        let mut wheel = TimerWheel::default();
        let start = at(0);
        wheel.advance(start, |_: u64| ());
        // One timer stays; a million come and go behind it.
        let _stuck = wheel.insert(start + Duration::from_secs(1800), 0);
        for id in 1..1_000_000u64 {
            let key = wheel.insert(start + Duration::from_secs(1800), id);
            assert_eq!(wheel.remove(key), id);
        }
        assert_eq!(wheel.len(), 1);
        assert!(wheel.allocated() <= 2 * SLAB_CHUNK);
        // A burst, then all cancelled: the slab lets its chunks go.
        let keys: Vec<_> = (0..100_000)
            .map(|id| wheel.insert(start + Duration::from_secs(5), id))
            .collect();
        assert!(wheel.allocated() >= 100_000);
        for key in keys {
            wheel.remove(key);
        }
        assert_eq!(
            wheel.allocated(),
            2 * SLAB_CHUNK,
            "the live one's, and a spare"
        );
    }
}
