//! Live figures of a running broker, readable from any thread without asking the core
//! task: the core task publishes its [`CoreStats`] here once per turn, the listener counts
//! connections. Tests use it to wait for conditions; the metrics endpoint will read it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

use super::core::CoreStats;

/// Shared, lock-free broker figures.
#[derive(Debug, Default)]
pub struct BrokerMetrics {
    connections: AtomicUsize,
    throttled_connections: AtomicUsize,
    queues: AtomicUsize,
    consumers: AtomicUsize,
    ready: AtomicUsize,
    in_flight: AtomicUsize,
    delayed: AtomicUsize,
    memory_bytes: AtomicU64,
    published_total: AtomicU64,
    delivered_total: AtomicU64,
    acked_total: AtomicU64,
    nacked_total: AtomicU64,
    dead_lettered_total: AtomicU64,
    discarded_total: AtomicU64,
}

/// The figures at one moment (each read on its own; they may be a turn apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MetricsSnapshot {
    /// Open client connections, registered or not.
    pub connections: usize,
    /// Connections not being read because their client is not reading its replies.
    pub throttled_connections: usize,
    pub core: CoreStats,
}

impl BrokerMetrics {
    pub fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            connections: self.connections.load(Relaxed),
            throttled_connections: self.throttled_connections.load(Relaxed),
            core: CoreStats {
                queues: self.queues.load(Relaxed),
                consumers: self.consumers.load(Relaxed),
                ready: self.ready.load(Relaxed),
                in_flight: self.in_flight.load(Relaxed),
                delayed: self.delayed.load(Relaxed),
                memory_bytes: self.memory_bytes.load(Relaxed),
                published_total: self.published_total.load(Relaxed),
                delivered_total: self.delivered_total.load(Relaxed),
                acked_total: self.acked_total.load(Relaxed),
                nacked_total: self.nacked_total.load(Relaxed),
                dead_lettered_total: self.dead_lettered_total.load(Relaxed),
                discarded_total: self.discarded_total.load(Relaxed),
            },
        }
    }

    pub(crate) fn record_core(&self, stats: &CoreStats) {
        self.queues.store(stats.queues, Relaxed);
        self.consumers.store(stats.consumers, Relaxed);
        self.ready.store(stats.ready, Relaxed);
        self.in_flight.store(stats.in_flight, Relaxed);
        self.delayed.store(stats.delayed, Relaxed);
        self.memory_bytes.store(stats.memory_bytes, Relaxed);
        self.published_total.store(stats.published_total, Relaxed);
        self.delivered_total.store(stats.delivered_total, Relaxed);
        self.acked_total.store(stats.acked_total, Relaxed);
        self.nacked_total.store(stats.nacked_total, Relaxed);
        self.dead_lettered_total
            .store(stats.dead_lettered_total, Relaxed);
        self.discarded_total.store(stats.discarded_total, Relaxed);
    }

    pub(crate) fn connection_opened(&self) {
        self.connections.fetch_add(1, Relaxed);
    }

    pub(crate) fn connection_closed(&self) {
        self.connections.fetch_sub(1, Relaxed);
    }

    pub(crate) fn set_throttled(&self, throttled: bool) {
        if throttled {
            self.throttled_connections.fetch_add(1, Relaxed);
        } else {
            self.throttled_connections.fetch_sub(1, Relaxed);
        }
    }
}
