//! What single operations on the queue core cost, as the allocator sees them: the broker
//! runs the core on one task, so an operation that copies a whole backlog stalls every
//! connection for as long as the copy takes, and memory that grows with what was acked
//! (not with what is in flight) grows without bound. Counted per thread by a wrapping
//! allocator, so tests running side by side do not disturb each other.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::{Duration, Instant};

use ferry::MessageId;
use ferry::broker::core::{ConsumerId, Core, CoreConfig, Delivery, NewMessage, WallClock};
use ferry::broker::policy::{Policies, QueuePolicy};
use ferry::protocol::{Payload, QueueName};

struct Counting;

thread_local! {
    /// The largest single allocation or reallocation this thread made since reset.
    static LARGEST: Cell<usize> = const { Cell::new(0) };
    /// Bytes this thread allocated minus bytes it freed.
    static LIVE: Cell<isize> = const { Cell::new(0) };
}

fn note_alloc(size: usize) {
    let _ = LARGEST.try_with(|largest| largest.set(largest.get().max(size)));
    let _ = LIVE.try_with(|live| live.set(live.get() + size as isize));
}

fn note_free(size: usize) {
    let _ = LIVE.try_with(|live| live.set(live.get() - size as isize));
}

// SAFETY: every call is passed on to the system allocator unchanged; the counting only
// touches const-initialised thread locals, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note_free(layout.size());
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_free(layout.size());
        note_alloc(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn core() -> Core {
    Core::new(CoreConfig {
        policies: Policies::uniform(QueuePolicy::new(Duration::from_secs(1800))),
        max_memory_bytes: u64::MAX,
        wall_clock: WallClock::now(),
    })
}

/// Every delivery the core will make at `now`.
fn deliveries(core: &mut Core, now: Instant) -> Vec<Delivery> {
    let mut made = Vec::new();
    core.dispatch(now, |d| made.push(d));
    made
}

/// A growing `VecDeque` reallocates, and copies, its whole contents at every doubling:
/// at two million 32-byte entries, 64 MiB in one publish. The ready queue's chunks never
/// move; only its spine of chunk pointers grows, 8 bytes per 64 messages.
#[test]
fn no_publish_into_a_deep_backlog_allocates_in_proportion_to_it() {
    let mut core = core();
    let queue = QueueName::new("deep").unwrap();
    let payload = Payload::from_text("");
    LARGEST.with(|largest| largest.set(0));
    let messages = 2_000_000;
    for _ in 0..messages {
        core.publish(&queue, NewMessage::now(payload.clone()))
            .unwrap();
    }
    let largest = LARGEST.with(Cell::get);
    assert!(
        largest <= 512 * 1024,
        "a publish made a {largest}-byte allocation into a backlog of {messages} messages"
    );
    assert_eq!(core.stats().ready, messages);
}

/// The deadline of every acked message must go when it is acked, even when an older
/// delivery is never acked (a FIFO of deadlines drops them only from its front).
#[test]
fn memory_for_leases_follows_what_is_in_flight_not_what_was_acked() {
    let mut core = core();
    let queue = QueueName::new("q").unwrap();
    let consumer = ConsumerId(1);
    let now = Instant::now();
    core.subscribe(consumer, queue.clone(), 10, None);
    core.publish(&queue, NewMessage::now(Payload::from_text("stuck")))
        .unwrap();
    assert_eq!(deliveries(&mut core, now).len(), 1);
    // Warm up: the first rounds allocate what a steady state reuses.
    let round = |core: &mut Core| {
        let id = core
            .publish(&queue, NewMessage::now(Payload::from_text("x")))
            .unwrap()
            .id;
        let made = deliveries(core, now);
        assert_eq!(made.iter().map(|d| d.id).collect::<Vec<_>>(), [id]);
        core.ack(consumer, id).unwrap();
    };
    for _ in 0..10_000 {
        round(&mut core);
    }
    let before = LIVE.with(Cell::get);
    for _ in 0..200_000 {
        round(&mut core);
    }
    let grown = LIVE.with(Cell::get) - before;
    assert!(
        grown < 64 * 1024,
        "200,000 acked deliveries behind one in flight left {grown} bytes behind"
    );
    assert_eq!(core.stats().in_flight, 1);
    assert!(core.ack(consumer, MessageId(1)).is_ok());
}
