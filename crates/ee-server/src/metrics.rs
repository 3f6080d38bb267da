//! Prometheus metrics, rendered in the text exposition format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Seconds; fits both time to first token and inter-token latency.
const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn new() -> Self {
        Self {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            if secs <= *bound {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                count.load(Ordering::Relaxed)
            );
        }
        let total = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {total}");
    }
}

/// The engine's live counts, read from its stats when `/metrics` is asked.
#[derive(Debug, Default, Clone, Copy)]
pub struct EngineGauges {
    pub waiting: usize,
    pub running: usize,
    /// Positions taken from kept prompt caches (a counter).
    pub cached_prompt_tokens: usize,
    pub kv_blocks_used: usize,
    pub kv_blocks_total: usize,
    /// Sequences preempted to free KV blocks (a counter).
    pub preemptions: usize,
}

pub struct Metrics {
    requests: Mutex<BTreeMap<u16, u64>>,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Mutex::new(BTreeMap::new()),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            time_to_first_token: Histogram::new(),
            inter_token_latency: Histogram::new(),
        }
    }
}

impl Metrics {
    pub fn record_status(&self, status: u16) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry(status).or_insert(0) += 1;
        }
    }

    /// The Prometheus text.
    pub fn render(&self, engine: &EngineGauges) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# HELP ee_requests_total HTTP requests by status code.\n# TYPE ee_requests_total counter");
        if let Ok(m) = self.requests.lock() {
            for (status, n) in m.iter() {
                let _ = writeln!(out, "ee_requests_total{{status=\"{status}\"}} {n}");
            }
        }
        for (name, help, v) in [
            (
                "ee_prompt_tokens_total",
                "Prompt tokens processed.",
                &self.prompt_tokens,
            ),
            (
                "ee_completion_tokens_total",
                "Tokens generated.",
                &self.completion_tokens,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let name = "ee_prompt_tokens_cached_total";
        let _ = writeln!(
            out,
            "# HELP {name} Positions taken from kept prompt caches, not prefilled \
             (again when a preempted request runs again).\n\
             # TYPE {name} counter\n{name} {}",
            engine.cached_prompt_tokens
        );
        let name = "ee_preemptions_total";
        let _ = writeln!(
            out,
            "# HELP {name} Sequences preempted to free KV blocks, to be recomputed \
             (vLLM's num_preemptions).\n# TYPE {name} counter\n{name} {}",
            engine.preemptions
        );
        let usage = match engine.kv_blocks_total {
            0 => 0.0,
            total => engine.kv_blocks_used as f64 / total as f64,
        };
        let blocks = format!("blocks of {} positions", ee_engine::kv_cache::BLOCK_TOKENS);
        for (name, help, v) in [
            (
                "ee_queue_depth",
                "Sequences waiting for a batch slot or for room in the KV pool, preempted ones included.".to_owned(),
                engine.waiting as f64,
            ),
            (
                "ee_running_sequences",
                "Sequences in the running batch.".to_owned(),
                engine.running as f64,
            ),
            (
                "ee_kv_cache_blocks_used",
                format!("KV pool {blocks} granted to running sequences."),
                engine.kv_blocks_used as f64,
            ),
            (
                "ee_kv_cache_blocks_total",
                format!("KV pool size, in {blocks}."),
                engine.kv_blocks_total as f64,
            ),
            (
                "ee_kv_cache_usage_ratio",
                "Fraction of the KV pool granted (vLLM's kv_cache_usage_perc).".to_owned(),
                usage,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        self.time_to_first_token.render(
            "ee_time_to_first_token_seconds",
            "Time from request to first token.",
            &mut out,
        );
        self.inter_token_latency.render(
            "ee_inter_token_latency_seconds",
            "Time between consecutive tokens of a sequence.",
            &mut out,
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_cumulative_histograms() {
        let m = Metrics::default();
        m.record_status(200);
        m.record_status(200);
        m.record_status(400);
        m.time_to_first_token.observe(Duration::from_millis(30));
        let text = m.render(&EngineGauges {
            waiting: 2,
            running: 3,
            cached_prompt_tokens: 7,
            kv_blocks_used: 16,
            kv_blocks_total: 64,
            preemptions: 5,
        });
        assert!(text.contains("ee_requests_total{status=\"200\"} 2"));
        assert!(text.contains("ee_kv_cache_blocks_used 16"));
        assert!(text.contains("ee_kv_cache_blocks_total 64"));
        assert!(text.contains("ee_kv_cache_usage_ratio 0.25"));
        assert!(text.contains("ee_queue_depth 2"));
        assert!(text.contains("ee_running_sequences 3"));
        assert!(text.contains("ee_prompt_tokens_cached_total 7"));
        assert!(text.contains("# TYPE ee_preemptions_total counter\nee_preemptions_total 5"));
        assert!(text.contains("ee_time_to_first_token_seconds_bucket{le=\"0.025\"} 0"));
        assert!(text.contains("ee_time_to_first_token_seconds_bucket{le=\"0.05\"} 1"));
        assert!(text.contains("ee_time_to_first_token_seconds_count 1"));
    }
}
