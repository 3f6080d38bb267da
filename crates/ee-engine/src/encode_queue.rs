//! The encoder's scheduler: requests for embeddings or classes wait in one
//! FIFO queue, and an engine thread runs them in packed batches of at most
//! `max_batch_tokens` tokens, as many queued requests at once as fit.
//!
//! Encoder work is not decode steps: a request is one forward pass with no
//! state kept between passes, so there is nothing to interleave; batching
//! whole requests (a request larger than the budget is split across
//! passes) is the whole job, as vLLM's pooling runner does. A server
//! process hosts either a causal LM or an encoder, so this queue never
//! competes with chat traffic for the cores.

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};

use tokio::sync::oneshot;

use crate::encoder::Encoder;
use crate::scheduler::{SchedulerStats, SubmitError};
use crate::Error;

/// What a request asks of the encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolingTask {
    /// One pooled embedding per sequence ([`Encoder::embed`]).
    Embed,
    /// Class probabilities per sequence ([`Encoder::classify`]).
    Classify,
}

#[derive(Debug, Clone)]
pub struct EncodeQueueConfig {
    /// Tokens per forward pass.
    pub max_batch_tokens: usize,
    /// Requests that may wait; more are refused.
    pub max_queue: usize,
}

/// One vector per sequence, in order, or why the pass failed.
pub type PoolingResult = Result<Vec<Vec<f32>>, Error>;

struct Job {
    sequences: Vec<Vec<u32>>,
    task: PoolingTask,
    reply: oneshot::Sender<PoolingResult>,
}

/// A running encoder with its queue.
pub struct EncodeQueue {
    tx: mpsc::Sender<Job>,
    model: Arc<dyn Encoder>,
    stats: Arc<SchedulerStats>,
    max_queue: usize,
}

impl EncodeQueue {
    /// Starts the engine thread for `model`.
    pub fn start(model: Arc<dyn Encoder>, config: EncodeQueueConfig) -> Self {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(SchedulerStats::default());
        let (engine, counts) = (model.clone(), stats.clone());
        let budget = config.max_batch_tokens.max(1);
        std::thread::Builder::new()
            .name("ee-encoder".into())
            .spawn(move || run(&*engine, &rx, &counts, budget))
            .expect("spawning the encoder thread");
        Self {
            tx,
            model,
            stats,
            max_queue: config.max_queue,
        }
    }

    /// The model the queue runs.
    pub fn model(&self) -> &Arc<dyn Encoder> {
        &self.model
    }

    pub fn stats(&self) -> &SchedulerStats {
        &self.stats
    }

    /// Queues `sequences` (validated by the caller: not empty, each within
    /// the vocabulary and the model's positions) for `task`.
    pub fn submit(
        &self,
        sequences: Vec<Vec<u32>>,
        task: PoolingTask,
    ) -> Result<oneshot::Receiver<PoolingResult>, SubmitError> {
        let waiting = self.stats.waiting.fetch_add(1, Ordering::SeqCst);
        if waiting >= self.max_queue {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull(waiting));
        }
        let (reply, rx) = oneshot::channel();
        let job = Job {
            sequences,
            task,
            reply,
        };
        self.tx.send(job).map_err(|_| {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            SubmitError::Stopped
        })?;
        Ok(rx)
    }
}

/// The engine thread: takes the oldest job and every queued one behind it
/// that fits the pass with it, runs them, answers each.
fn run(model: &dyn Encoder, rx: &mpsc::Receiver<Job>, stats: &SchedulerStats, budget: usize) {
    let mut held: Option<Job> = None;
    loop {
        let first = match held.take() {
            Some(job) => job,
            None => match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            },
        };
        let mut jobs = vec![first];
        let mut tokens: usize = jobs[0].sequences.iter().map(Vec::len).sum();
        while tokens < budget {
            match rx.try_recv() {
                Ok(job) if job.task == jobs[0].task => {
                    tokens += job.sequences.iter().map(Vec::len).sum::<usize>();
                    jobs.push(job);
                }
                Ok(job) => {
                    // Another task waits for the next pass, first in line.
                    held = Some(job);
                    break;
                }
                Err(_) => break,
            }
        }
        stats.waiting.fetch_sub(jobs.len(), Ordering::SeqCst);
        stats.running.store(jobs.len(), Ordering::Relaxed);
        let task = jobs[0].task;
        let all: Vec<&[u32]> = jobs
            .iter()
            .flat_map(|j| j.sequences.iter().map(Vec::as_slice))
            .collect();
        match run_passes(model, task, &all, budget) {
            Ok(mut vectors) if vectors.len() == all.len() => {
                for job in jobs.into_iter().rev() {
                    let mine = vectors.split_off(vectors.len() - job.sequences.len());
                    // A client that left drops its receiver: nothing to do.
                    let _ = job.reply.send(Ok(mine));
                }
            }
            // One job's failure is not its neighbours': each runs alone
            // (and a model that answered the wrong count fails each).
            _ => {
                for job in jobs {
                    let seqs: Vec<&[u32]> = job.sequences.iter().map(Vec::as_slice).collect();
                    let result = run_passes(model, task, &seqs, budget).and_then(|v| {
                        match v.len() == seqs.len() {
                            true => Ok(v),
                            false => Err(Error::Model(format!(
                                "the encoder returned {} results for {} inputs",
                                v.len(),
                                seqs.len()
                            ))),
                        }
                    });
                    let _ = job.reply.send(result);
                }
            }
        }
        stats.running.store(0, Ordering::Relaxed);
    }
}

/// Runs `sequences` in passes of at most `budget` tokens (a longer
/// sequence alone in its pass).
fn run_passes(
    model: &dyn Encoder,
    task: PoolingTask,
    sequences: &[&[u32]],
    budget: usize,
) -> PoolingResult {
    let mut out = Vec::with_capacity(sequences.len());
    let mut start = 0;
    // A pass holds whole sequences, at least one.
    while start < sequences.len() {
        let mut end = start + 1;
        let mut tokens = sequences[start].len();
        while end < sequences.len() && tokens + sequences[end].len() <= budget {
            tokens += sequences[end].len();
            end += 1;
        }
        let pass = &sequences[start..end];
        out.extend(match task {
            PoolingTask::Embed => model.embed(pass)?,
            PoolingTask::Classify => model.classify(pass)?,
        });
        start = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::encoder::{write_tiny_encoder, TinyEncoderKind, TinyEncoderSpec};

    fn tiny() -> (tempfile::TempDir, Arc<dyn Encoder>) {
        let dir = tempfile::tempdir().unwrap();
        let spec = TinyEncoderSpec::classifier(TinyEncoderKind::Bert, 50);
        write_tiny_encoder(dir.path(), &spec, None).unwrap();
        let model = crate::ModelFiles::open(dir.path())
            .unwrap()
            .load_encoder()
            .unwrap();
        (dir, model)
    }

    #[test]
    fn queued_jobs_get_their_own_results_whatever_the_passes() {
        let (_dir, model) = tiny();
        // A budget of 5 tokens splits these jobs over several passes.
        let queue = EncodeQueue::start(
            model.clone(),
            EncodeQueueConfig {
                max_batch_tokens: 5,
                max_queue: 16,
            },
        );
        let jobs: Vec<(Vec<Vec<u32>>, PoolingTask)> = vec![
            (vec![vec![1, 2, 3], vec![4]], PoolingTask::Embed),
            (vec![vec![5, 6, 7, 8, 9, 10]], PoolingTask::Classify),
            (vec![vec![11, 12]], PoolingTask::Embed),
            // Out of range: this job fails alone.
            (vec![vec![99]], PoolingTask::Embed),
        ];
        let receivers: Vec<_> = jobs
            .iter()
            .map(|(s, t)| queue.submit(s.clone(), *t).unwrap())
            .collect();
        for ((seqs, task), rx) in jobs.iter().zip(receivers) {
            let got = rx.blocking_recv().unwrap();
            if seqs[0][0] == 99 {
                assert!(got.unwrap_err().to_string().contains("99"));
                continue;
            }
            let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
            let expected = match task {
                PoolingTask::Embed => model.embed(&refs).unwrap(),
                PoolingTask::Classify => model.classify(&refs).unwrap(),
            };
            assert_eq!(got.unwrap(), expected);
        }
        assert_eq!(queue.stats().waiting.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_full_queue_refuses_and_counts_nothing() {
        let (_dir, model) = tiny();
        let queue = EncodeQueue::start(
            model,
            EncodeQueueConfig {
                max_batch_tokens: 64,
                max_queue: 0,
            },
        );
        let err = queue.submit(vec![vec![1]], PoolingTask::Embed).unwrap_err();
        assert!(matches!(err, SubmitError::QueueFull(0)));
        assert_eq!(queue.stats().waiting.load(Ordering::SeqCst), 0);
    }
}
