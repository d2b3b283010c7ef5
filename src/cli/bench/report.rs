//! The bench report: computed once from the run's figures, printed as text or JSON.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

pub struct BrokerFigures {
    pub cpu: Duration,
    pub peak_rss_bytes: u64,
}

/// What was run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Workload {
    pub producers: u32,
    pub consumers: u32,
    pub queues: u32,
    pub payload_bytes: usize,
    pub window: u32,
    pub prefetch: u16,
    pub rate: Option<f64>,
    /// Share of messages nacked once before their ack.
    pub nack_ratio: f64,
    /// Delays spread from 0 to this (latency is then lateness past the due time).
    pub delay_ms: Option<u64>,
    /// Priorities published in turn.
    pub priorities: u8,
    /// Messages per publish frame (1: single publishes).
    pub batch: u16,
}

/// What happened to the messages (summed over runs).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Counts {
    pub confirmed: u64,
    pub refused: u64,
    pub delivered: u64,
    /// Deliveries nacked (each message at most once).
    pub nacked: u64,
    pub duplicates: u64,
    pub lost: u64,
}

impl std::ops::Add for Counts {
    type Output = Counts;

    fn add(self, other: Counts) -> Counts {
        Counts {
            confirmed: self.confirmed + other.confirmed,
            refused: self.refused + other.refused,
            delivered: self.delivered + other.delivered,
            nacked: self.nacked + other.nacked,
            duplicates: self.duplicates + other.duplicates,
            lost: self.lost + other.lost,
        }
    }
}

/// The raw figures of a run.
pub struct Inputs {
    pub workload: Workload,
    pub counts: Counts,
    /// First publish to last ack.
    pub end_to_end: Duration,
    /// First publish to last confirm.
    pub confirm_span: Duration,
    pub latency_ns: Histogram<u64>,
    pub broker: Option<BrokerFigures>,
    pub bench_cpu: Duration,
    /// Percent of the machine's CPU time the hypervisor gave elsewhere during the run.
    pub steal_percent: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// How many runs the figures below are the median of (counts are summed).
    pub runs: usize,
    /// End-to-end throughput of each run, in run order.
    pub msgs_per_sec_each_run: Vec<f64>,
    #[serde(flatten)]
    pub workload: Workload,
    #[serde(flatten)]
    pub counts: Counts,
    pub seconds: f64,
    pub msgs_per_sec: f64,
    pub payload_mb_per_sec: f64,
    pub confirms_per_sec: f64,
    pub latency_us: Latency,
    pub broker_cpu_seconds: Option<f64>,
    pub msgs_per_broker_cpu_second: Option<f64>,
    pub broker_peak_rss_mb: Option<f64>,
    pub bench_cpu_seconds: f64,
    /// CPU time stolen by the hypervisor during the run, in percent of the machine: when
    /// it is more than a few percent, the host was busy and the figures are pessimistic.
    pub steal_percent: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub max: f64,
}

const MB: f64 = 1_000_000.0;

impl Report {
    pub fn new(inputs: Inputs) -> Report {
        let seconds = inputs.end_to_end.as_secs_f64();
        let per_second = |count: f64, over: Duration| {
            if over.is_zero() {
                0.0
            } else {
                count / over.as_secs_f64()
            }
        };
        let quantile_us = |q: f64| inputs.latency_ns.value_at_quantile(q) as f64 / 1000.0;
        let counts = inputs.counts;
        let msgs_per_sec = per_second(counts.delivered as f64, inputs.end_to_end);
        Report {
            runs: 1,
            msgs_per_sec_each_run: vec![msgs_per_sec],
            workload: inputs.workload,
            counts,
            seconds,
            msgs_per_sec,
            payload_mb_per_sec: per_second(
                (counts.delivered * inputs.workload.payload_bytes as u64) as f64 / MB,
                inputs.end_to_end,
            ),
            confirms_per_sec: per_second(counts.confirmed as f64, inputs.confirm_span),
            latency_us: Latency {
                p50: quantile_us(0.5),
                p99: quantile_us(0.99),
                p99_9: quantile_us(0.999),
                max: inputs.latency_ns.max() as f64 / 1000.0,
            },
            broker_cpu_seconds: inputs.broker.as_ref().map(|b| b.cpu.as_secs_f64()),
            // Without consumers the broker's work is the publishes it confirmed.
            msgs_per_broker_cpu_second: inputs.broker.as_ref().map(|b| {
                let handled = if inputs.workload.consumers == 0 {
                    counts.confirmed
                } else {
                    counts.delivered
                };
                per_second(handled as f64, b.cpu)
            }),
            broker_peak_rss_mb: inputs.broker.as_ref().map(|b| b.peak_rss_bytes as f64 / MB),
            bench_cpu_seconds: inputs.bench_cpu.as_secs_f64(),
            steal_percent: inputs.steal_percent,
        }
    }

    /// The median of each figure over several runs of one workload; counts are summed.
    pub fn median_of(reports: Vec<Report>) -> Report {
        let median = |reports: &[Report], figure: &dyn Fn(&Report) -> f64| {
            let mut values: Vec<f64> = reports.iter().map(figure).collect();
            values.sort_by(f64::total_cmp);
            values[values.len() / 2]
        };
        let optional = |reports: &[Report], figure: &dyn Fn(&Report) -> Option<f64>| {
            reports
                .iter()
                .all(|r| figure(r).is_some())
                .then(|| median(reports, &|r| figure(r).unwrap_or(0.0)))
        };
        let r = &reports;
        Report {
            runs: r.len(),
            msgs_per_sec_each_run: r.iter().map(|run| run.msgs_per_sec).collect(),
            counts: r
                .iter()
                .fold(Counts::default(), |sum, run| sum + run.counts),
            seconds: median(r, &|x| x.seconds),
            msgs_per_sec: median(r, &|x| x.msgs_per_sec),
            payload_mb_per_sec: median(r, &|x| x.payload_mb_per_sec),
            confirms_per_sec: median(r, &|x| x.confirms_per_sec),
            latency_us: Latency {
                p50: median(r, &|x| x.latency_us.p50),
                p99: median(r, &|x| x.latency_us.p99),
                p99_9: median(r, &|x| x.latency_us.p99_9),
                max: median(r, &|x| x.latency_us.max),
            },
            broker_cpu_seconds: optional(r, &|x| x.broker_cpu_seconds),
            msgs_per_broker_cpu_second: optional(r, &|x| x.msgs_per_broker_cpu_second),
            broker_peak_rss_mb: optional(r, &|x| x.broker_peak_rss_mb),
            bench_cpu_seconds: median(r, &|x| x.bench_cpu_seconds),
            steal_percent: median(r, &|x| x.steal_percent),
            ..reports[0].clone()
        }
    }

    pub fn one_line(&self) -> String {
        format!(
            "{:.0} msg/s, {:.1} MB/s, p50 {:.0} us, p99 {:.0} us, p99.9 {:.0} us, lost {}, duplicated {}, steal {:.1}%",
            self.msgs_per_sec,
            self.payload_mb_per_sec,
            self.latency_us.p50,
            self.latency_us.p99,
            self.latency_us.p99_9,
            self.counts.lost,
            self.counts.duplicates,
            self.steal_percent
        )
    }

    pub fn print_text(&self) {
        if self.runs > 1 {
            let each: Vec<String> = self
                .msgs_per_sec_each_run
                .iter()
                .map(|r| format!("{r:.0}"))
                .collect();
            println!(
                "runs         {} (medians below; counts summed); msg/s each run: {}",
                self.runs,
                each.join(", ")
            );
        }
        let (w, c) = (&self.workload, &self.counts);
        let rate = w
            .rate
            .map_or("as fast as possible".to_owned(), |r| format!("{r} msg/s"));
        println!(
            "workload     {} queue(s), {} producer(s), {} consumer(s), {} B payloads, window {}, prefetch {}, {rate}",
            w.queues, w.producers, w.consumers, w.payload_bytes, w.window, w.prefetch
        );
        if w.nack_ratio > 0.0 || w.delay_ms.is_some() || w.priorities > 1 || w.batch > 1 {
            println!(
                "             protocol 1.1: {:.0}% nacked once; delays {}; {} priorities; {} per publish frame",
                w.nack_ratio * 100.0,
                w.delay_ms
                    .map_or("none".to_owned(), |ms| format!("spread over 0-{ms} ms")),
                w.priorities,
                w.batch
            );
        }
        println!(
            "messages     {} confirmed, {} refused, {} delivered, {} nacked, {} lost, {} duplicated",
            c.confirmed, c.refused, c.delivered, c.nacked, c.lost, c.duplicates
        );
        if w.consumers == 0 {
            println!(
                "             no consumers: all {} confirmed messages were left queued",
                c.confirmed
            );
        }
        println!(
            "end to end   {:.0} msg/s, {:.1} MB/s of payload, over {:.2} s (first publish to last ack)",
            self.msgs_per_sec, self.payload_mb_per_sec, self.seconds
        );
        println!("confirms     {:.0} msg/s", self.confirms_per_sec);
        let l = &self.latency_us;
        let measured = if w.delay_ms.is_some() {
            "lateness: delivery past the due time"
        } else {
            "publish to delivery"
        };
        println!(
            "latency      p50 {:.0} us, p99 {:.0} us, p99.9 {:.0} us, max {:.0} us ({measured})",
            l.p50, l.p99, l.p99_9, l.max
        );
        if let (Some(cpu), Some(per_cpu), Some(rss)) = (
            self.broker_cpu_seconds,
            self.msgs_per_broker_cpu_second,
            self.broker_peak_rss_mb,
        ) {
            println!(
                "broker       {cpu:.2} CPU s, {per_cpu:.0} msg per CPU s, peak RSS {rss:.1} MB"
            );
        }
        println!(
            "bench        {:.2} CPU s (load generator, same machine)",
            self.bench_cpu_seconds
        );
    }
}
