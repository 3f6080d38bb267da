use super::*;
use crate::generate::{generate, GenerateOptions};
use crate::testing::{write_tiny_model, TinySpec};
use std::time::{Duration, Instant};

fn tiny() -> (tempfile::TempDir, Arc<dyn CausalLm>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    write_tiny_model(&path, &TinySpec::llama_q4_1()).unwrap();
    let model = crate::load(&path).unwrap();
    (dir, model)
}

fn request(prompt: Vec<u32>, max_tokens: usize) -> SequenceRequest {
    SequenceRequest {
        prompt,
        sampling: SamplingParams::greedy(),
        max_tokens,
        stop_token_ids: vec![],
        top_logprobs: None,
        cache_prompt: false,
    }
}

fn collect(
    mut rx: tokio_mpsc::UnboundedReceiver<SequenceEvent>,
) -> (Vec<u32>, Option<FinishReason>) {
    let mut tokens = Vec::new();
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            SequenceEvent::Token(s) => tokens.push(s.token),
            SequenceEvent::Finished { reason, .. } => return (tokens, Some(reason)),
            SequenceEvent::Failed(e) => panic!("failed: {e}"),
        }
    }
    (tokens, None)
}

/// Greedy for even `i`; for odd `i`, a draw at temperature 0.9 with `seed`.
fn greedy_or_seeded(i: usize, seed: u64) -> SamplingParams {
    match i % 2 {
        0 => SamplingParams::greedy(),
        _ => SamplingParams {
            temperature: 0.9,
            seed: Some(seed),
            ..Default::default()
        },
    }
}

#[test]
fn prefill_chunks_are_never_one_row_while_more_remain() {
    assert_eq!(prefill_take(10, 512), 10);
    assert_eq!(prefill_take(1, 512), 1, "a one-token prompt is one row");
    assert_eq!(prefill_take(10, 9), 8, "never leave one behind");
    assert_eq!(prefill_take(10, 1), 0, "never feed one of many");
    assert_eq!(prefill_take(10, 2), 2);
    assert_eq!(prefill_take(3, 2), 0);
    assert_eq!(
        prefill_take(17, MIN_PREFILL_CHUNK),
        15,
        "the oldest prompt's floor never leaves one behind either"
    );
}

/// A prompt continued from a kept one draws the same tokens with the
/// same log-probabilities, bit for bit, as the prompt prefilled whole.
#[test]
fn a_prompt_continued_from_a_kept_prompt_equals_it_prefilled_whole() {
    let (_dir, model) = tiny();
    let sched = Scheduler::start(model, SchedulerConfig::default());
    let first: Vec<u32> = (0..30).map(|j| (j * 13 % 240 + 3) as u32).collect();
    let longer: Vec<u32> = first.iter().copied().chain([9, 8, 7]).collect();
    let run = |prompt: &Vec<u32>, cache_prompt: bool| {
        let mut rx = sched
            .submit(SequenceRequest {
                cache_prompt,
                top_logprobs: Some(3),
                ..request(prompt.clone(), 6)
            })
            .unwrap();
        let mut drawn = Vec::new();
        while let Some(ev) = rx.blocking_recv() {
            match ev {
                SequenceEvent::Token(s) => drawn.push(format!("{:?}", s)),
                SequenceEvent::Finished { .. } => break,
                SequenceEvent::Failed(e) => panic!("{e}"),
            }
        }
        drawn
    };
    let whole = run(&longer, false);
    run(&first, true);
    assert_eq!(sched.stats().cached_prompt_tokens.load(Ordering::SeqCst), 0);
    let continued = run(&longer, true);
    let cached = || sched.stats().cached_prompt_tokens.load(Ordering::SeqCst);
    assert_eq!(cached(), 30);
    assert_eq!(whole, continued);
    // One token longer than a kept prompt: its last position is fed again.
    let one_more: Vec<u32> = longer.iter().copied().chain([5]).collect();
    let whole = run(&one_more, false);
    let continued = run(&one_more, true);
    assert_eq!(cached(), 30 + 32);
    assert_eq!(whole, continued);
}

#[test]
fn concurrent_sequences_equal_the_same_sequences_alone() {
    let (_dir, model) = tiny();
    let prompts: Vec<Vec<u32>> = (0..9)
        .map(|i| {
            (0..(4 + 9 * i))
                .map(|j| ((j * 31 + i * 7) % 250 + 3) as u32)
                .collect()
        })
        .collect();
    // Even-numbered sequences are greedy, odd ones draw with their own
    // seed: sampling in parallel must keep each sequence's RNG its own.
    let sampling = |i: usize| greedy_or_seeded(i, i as u64);
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let opts = GenerateOptions {
                max_tokens: 12,
                sampling: sampling(i),
                ..Default::default()
            };
            generate(model.as_ref(), p, &opts, |_| {})
                .unwrap()
                .token_ids()
        })
        .collect();
    let greedy = |p: &[u32]| {
        let opts = GenerateOptions {
            max_tokens: 12,
            ..Default::default()
        };
        generate(model.as_ref(), p, &opts, |_| {})
            .unwrap()
            .token_ids()
    };
    assert!(
        (1..9).step_by(2).any(|i| alone[i] != greedy(&prompts[i])),
        "the seeded draws must differ from greedy somewhere, or they test nothing"
    );
    // A small batch and budget force chunked prefill interleaved with
    // decoding; a large one puts eight and more rows in one step.
    for (max_batch, step_token_budget) in [(3, 7), (9, 64)] {
        let sched = Scheduler::start(
            model.clone(),
            SchedulerConfig {
                max_batch,
                max_queue: 16,
                step_token_budget,
                ..SchedulerConfig::default()
            },
        );
        let receivers: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let r = SequenceRequest {
                    sampling: sampling(i),
                    ..request(p.clone(), 12)
                };
                sched.submit(r).unwrap()
            })
            .collect();
        for (i, rx) in receivers.into_iter().enumerate() {
            let (tokens, reason) = collect(rx);
            assert_eq!(tokens, alone[i], "sequence {i}, batch {max_batch}");
            assert_eq!(reason, Some(FinishReason::Length));
        }
    }
}

#[test]
fn stop_tokens_end_a_sequence() {
    let (_dir, model) = tiny();
    let sched = Scheduler::start(model.clone(), SchedulerConfig::default());
    let (free, _) = collect(sched.submit(request(vec![5, 6, 7], 8)).unwrap());
    let stop = free[2];
    let first = free.iter().position(|&t| t == stop).unwrap();
    let (tokens, reason) = collect(
        sched
            .submit(SequenceRequest {
                stop_token_ids: vec![stop],
                ..request(vec![5, 6, 7], 8)
            })
            .unwrap(),
    );
    assert_eq!(reason, Some(FinishReason::Stop));
    assert_eq!(tokens, free[..=first]);
}

#[test]
fn a_dropped_receiver_frees_its_slot() {
    let (_dir, model) = tiny();
    let sched = Scheduler::start(model, SchedulerConfig::default());
    let mut rx = sched.submit(request(vec![5, 6, 7], 200)).unwrap();
    assert!(matches!(rx.blocking_recv(), Some(SequenceEvent::Token(_))));
    drop(rx);
    let deadline = Instant::now() + Duration::from_secs(10);
    while sched.stats().running.load(Ordering::SeqCst) != 0 {
        assert!(
            Instant::now() < deadline,
            "cancelled sequence still running"
        );
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn the_queue_is_bounded_and_bad_requests_fail_cleanly() {
    let (_dir, model) = tiny();
    let vocab = model.vocab_size() as u32;
    let sched = Scheduler::start(
        model,
        SchedulerConfig {
            max_batch: 1,
            max_queue: 2,
            step_token_budget: 64,
            ..SchedulerConfig::default()
        },
    );
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..8 {
        match sched.submit(request(vec![5; 20], 100)) {
            Ok(rx) => held.push(rx),
            Err(SubmitError::QueueFull(_)) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(refused >= 4, "only {refused} refused");
    // Cancelled requests leave the queue between steps.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    while sched.stats().waiting.load(Ordering::SeqCst) != 0 {
        assert!(Instant::now() < deadline, "cancelled requests still queued");
        thread::sleep(Duration::from_millis(5));
    }
    let mut rx = sched.submit(request(vec![vocab], 4)).unwrap();
    loop {
        match rx.blocking_recv() {
            Some(SequenceEvent::Failed(msg)) => {
                assert!(msg.contains("outside the vocabulary"), "{msg}");
                break;
            }
            other => assert!(Instant::now() < deadline, "unexpected {other:?}"),
        }
    }
    // Still serving.
    let (tokens, _) = collect(sched.submit(request(vec![5, 6], 3)).unwrap());
    assert_eq!(tokens.len(), 3);
}

/// A pool of three blocks, and four sequences that each end up filling
/// two: they start with their prompt's one block (two at once, as the
/// watermark allows), and as they grow the youngest are preempted and
/// recomputed; half of them keep their prompts (`cache_prompt`), which
/// they may continue from. Each draws, greedy or
/// seeded, exactly what it draws alone, with log-probabilities bit for bit
/// those of a pool that preempts nothing. One that needs more than the
/// whole pool fails, and the scheduler keeps serving.
#[test]
fn the_kv_pool_grants_blocks_on_demand_and_preempts_the_youngest_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let mut last = None;
    for (name, spec) in crate::testing::TinySpec::all_variants() {
        let path = dir.path().join(format!("{name}.gguf"));
        write_tiny_model(&path, &spec).unwrap();
        last = Some(preempts_exactly(name, crate::load(&path).unwrap()));
    }
    let sched = last.unwrap();
    let mut rx = sched.submit(request(vec![5; 20], 90)).unwrap();
    match rx.blocking_recv() {
        Some(SequenceEvent::Failed(msg)) => {
            assert!(
                msg.contains("110 positions") && msg.contains("(96)"),
                "{msg}"
            )
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    let (tokens, _) = collect(sched.submit(request(vec![5, 6], 3)).unwrap());
    assert_eq!(tokens.len(), 3);
}

/// The test above on one model; returns the scheduler of the small pool.
fn preempts_exactly(name: &str, model: Arc<dyn CausalLm>) -> Scheduler {
    let block_bytes = model.kv_bytes_per_token() * BLOCK_TOKENS;
    let prompts: Vec<Vec<u32>> = (0..4)
        .map(|i| (0..20).map(|j| (j * 7 + i * 31) % 200 + 3).collect())
        .collect();
    let sampling = |i: usize| greedy_or_seeded(i, i as u64 + 40);
    // 20 + 30 positions: 2 blocks each by the end.
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let opts = GenerateOptions {
                max_tokens: 30,
                sampling: sampling(i),
                ..Default::default()
            };
            generate(model.as_ref(), p, &opts, |_| {})
                .unwrap()
                .token_ids()
        })
        .collect();
    // Every draw with its log-probabilities (Debug prints each f32 so
    // that it reads back to the same bits), and the most blocks granted
    // at any time the watcher looked.
    let run = |sched: &Scheduler| {
        let receivers: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let r = SequenceRequest {
                    sampling: sampling(i),
                    top_logprobs: Some(2),
                    cache_prompt: i % 2 == 1,
                    ..request(p.clone(), 30)
                };
                sched.submit(r).unwrap()
            })
            .collect();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher = {
            let (stats, done) = (sched.clone(), done.clone());
            thread::spawn(move || {
                let mut most_blocks = 0;
                while !done.load(Ordering::SeqCst) {
                    let used = stats.stats().kv_blocks_used.load(Ordering::SeqCst);
                    most_blocks = most_blocks.max(used);
                    thread::sleep(Duration::from_micros(200));
                }
                most_blocks
            })
        };
        let mut drawn = Vec::new();
        for (i, mut rx) in receivers.into_iter().enumerate() {
            let mut seq = Vec::new();
            while let Some(ev) = rx.blocking_recv() {
                match ev {
                    SequenceEvent::Token(s) => seq.push(s),
                    SequenceEvent::Finished {
                        reason,
                        completion_tokens,
                        ..
                    } => {
                        assert_eq!((reason, completion_tokens), (FinishReason::Length, 30));
                        break;
                    }
                    SequenceEvent::Failed(e) => panic!("failed: {e}"),
                }
            }
            let tokens: Vec<u32> = seq.iter().map(|s| s.token).collect();
            assert_eq!(tokens, alone[i], "{name}: sequence {i}");
            drawn.push(format!("{seq:?}"));
        }
        done.store(true, Ordering::SeqCst);
        (drawn, watcher.join().unwrap())
    };
    let roomy = Scheduler::start(model.clone(), SchedulerConfig::default());
    let (unpreempted, _) = run(&roomy);
    assert_eq!(roomy.stats().preemptions.load(Ordering::SeqCst), 0);
    assert_eq!(roomy.stats().cached_prompt_tokens.load(Ordering::SeqCst), 0);

    let sched = Scheduler::start(
        model,
        SchedulerConfig {
            kv_cache_bytes: 3 * block_bytes,
            ..SchedulerConfig::default()
        },
    );
    assert_eq!(sched.kv_pool_tokens(), 3 * BLOCK_TOKENS);
    let (drawn, most_blocks) = run(&sched);
    assert_eq!(drawn, unpreempted, "{name}");
    assert!(
        most_blocks <= 3,
        "{name}: {most_blocks} blocks of a pool of 3"
    );
    assert!(
        sched.stats().preemptions.load(Ordering::SeqCst) >= 1,
        "{name}: sequences that grow to six blocks in a pool of three preempt \
         (admitted by their worst case, they would run one at a time)"
    );
    assert_eq!(sched.stats().waiting.load(Ordering::SeqCst), 0, "{name}");
    sched
}

/// The engine's loop, to drive by hand, with a KV pool of `blocks`.
fn engine_with_pool(model: &Arc<dyn CausalLm>, blocks: usize) -> (EngineLoop, Arc<SchedulerStats>) {
    let stats = Arc::new(SchedulerStats::default());
    stats.kv_blocks_total.store(blocks, Ordering::SeqCst);
    let engine = EngineLoop::new(model.clone(), SchedulerConfig::default(), stats.clone());
    (engine, stats)
}

/// [`engine_with_pool`] running decoding sequences, oldest first, each
/// given as (tokens drawn after a prompt of 20, blocks granted); each one's
/// next token is the last one drawn. Also their event receivers, to keep.
fn decoding_in_pool(
    model: &Arc<dyn CausalLm>,
    pool: usize,
    sequences: &[(usize, usize)],
) -> (
    EngineLoop,
    Arc<SchedulerStats>,
    Vec<tokio_mpsc::UnboundedReceiver<SequenceEvent>>,
) {
    let (mut engine, stats) = engine_with_pool(model, pool);
    let mut receivers = Vec::new();
    for &(drawn, blocks) in sequences {
        let (events, rx) = tokio_mpsc::unbounded_channel();
        receivers.push(rx);
        let request = request(vec![3; 20], 150);
        let mut tokens = request.prompt.clone();
        tokens.extend(std::iter::repeat_n(4, drawn));
        engine.arrivals += 1;
        let seq = Running {
            sampler: Sampler::new(request.sampling.clone(), &request.prompt).unwrap(),
            fed: tokens.len() - 1,
            tokens,
            request,
            events,
            cache: model.new_cache(),
            kv_blocks: 0,
            arrival: engine.arrivals,
        };
        engine.start(seq, blocks);
    }
    (engine, stats, receivers)
}

fn held(engine: &EngineLoop) -> Vec<usize> {
    engine.running.iter().map(|s| s.kv_blocks).collect()
}

/// A sequence that must grow while an older one holds blocks granted
/// ahead of need takes those back instead of preempting anyone, and only
/// the block it needs; with none left to take back, the youngest is
/// preempted.
#[test]
fn blocks_granted_ahead_of_need_are_taken_back_before_preempting() {
    let (_dir, model) = tiny();
    // The older has 70 positions to fill (3 blocks) and was granted 4;
    // the younger's next token is its 33rd position, past its one block.
    let (mut engine, stats, _events) = decoding_in_pool(&model, 5, &[(50, 4), (13, 1)]);
    engine.grow_decoding();
    assert_eq!(held(&engine), [3, 2]);
    assert_eq!(stats.preemptions.load(Ordering::SeqCst), 0);

    let younger = &mut engine.running[1];
    younger.tokens.extend([4; 32]);
    younger.fed = younger.tokens.len() - 1;
    engine.grow_decoding();
    assert_eq!(engine.running.len(), 1);
    assert_eq!(engine.preempted.len(), 1);
    assert_eq!(held(&engine), [3]);
    assert_eq!(stats.preemptions.load(Ordering::SeqCst), 1);

    // Blocks taken back are not handed on as surplus: the older fills 2
    // of its 6, and the younger, at its 65th position, gets the one more
    // block it needs, not twice its 2.
    let (mut engine, _, _events) = decoding_in_pool(&model, 8, &[(30, 6), (45, 2)]);
    engine.grow_decoding();
    assert_eq!(held(&engine), [2, 3]);
}

/// Driven step by step, so that what runs together is certain: two
/// sequences that keep their prompts in a pool of three blocks. At their
/// 33rd position both need a second block; the older gets the free one and
/// the younger is preempted. Admitted again once the older is done, it
/// continues from its kept prompt (20 positions counted), draws exactly
/// what it draws alone, and leaves the kept prompt for a later request.
#[test]
fn a_preempted_sequence_continues_from_its_kept_prompt_exactly() {
    let (_dir, model) = tiny();
    let (mut engine, stats) = engine_with_pool(&model, 3);
    let prompts: Vec<Vec<u32>> = (0..2)
        .map(|i| (0..20).map(|j| (j * 7 + i * 31) % 200 + 3).collect())
        .collect();
    let mut receivers = Vec::new();
    for (i, prompt) in prompts.iter().enumerate() {
        let (events, rx) = tokio_mpsc::unbounded_channel();
        receivers.push(rx);
        let request = SequenceRequest {
            sampling: greedy_or_seeded(i, 7),
            cache_prompt: true,
            ..request(prompt.clone(), 30)
        };
        engine.waiting.push_back(Submission { request, events });
        stats.waiting.fetch_add(1, Ordering::SeqCst);
    }
    let mut steps = 0;
    while !(engine.waiting.is_empty() && engine.running.is_empty() && engine.preempted.is_empty()) {
        engine.admit();
        engine.step().unwrap();
        steps += 1;
        assert!(steps < 1000, "the engine stalled");
    }
    assert_eq!(stats.preemptions.load(Ordering::SeqCst), 1);
    assert_eq!(stats.cached_prompt_tokens.load(Ordering::SeqCst), 20);
    for (i, rx) in receivers.into_iter().enumerate() {
        let opts = GenerateOptions {
            max_tokens: 30,
            sampling: greedy_or_seeded(i, 7),
            ..Default::default()
        };
        let alone = generate(model.as_ref(), &prompts[i], &opts, |_| {}).unwrap();
        assert_eq!(collect(rx).0, alone.token_ids(), "sequence {i}");
    }
    let extended: Vec<u32> = prompts[1].iter().copied().chain([1, 2]).collect();
    let kept = engine.prompts.copy_longest(&extended).map(|(n, _)| n);
    assert_eq!(kept, Some(20));
}
