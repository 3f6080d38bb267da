//! Handlers: health, models, metrics, and the two generation endpoints,
//! streaming (SSE) or not.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Json;
use ee_api::{read_json, response_id, sse, unix_now, ApiError};
use ee_core::wire::{
    AssistantTokens, ChatChoice, ChatCompletionRequest, ChatCompletionResponse, CompletionChoice,
    CompletionRequest, CompletionResponse, FinishReason, Logprobs, ModelCard, ModelList,
    TokenLogprob, TopLogprob, Usage,
};
use ee_engine::{Sampled, SequenceEvent, SequenceRequest, SubmitError};
use futures_util::stream::{self, BoxStream, SelectAll, StreamExt};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::metrics::EngineGauges;
use crate::validate::{self, ValidRequest};
use crate::{LoadedModel, SharedState};

pub async fn health(State(state): State<SharedState>) -> Response {
    match state.loaded() {
        Ok(_) => Json(serde_json::json!({"status": "ok"})).into_response(),
        Err(e) => e.into_response(),
    }
}

pub async fn models(State(state): State<SharedState>) -> Result<Json<ModelList>, ApiError> {
    let loaded = state.loaded()?;
    Ok(Json(ModelList {
        object: "list".into(),
        data: loaded.cards.clone(),
    }))
}

/// `GET /v1/models/{id}`: one served name's card (the SDK's
/// `models.retrieve`).
pub async fn model(
    State(state): State<SharedState>,
    Path(id): Path<String>,
) -> Result<Json<ModelCard>, ApiError> {
    let loaded = state.loaded()?;
    loaded
        .card(&id)
        .cloned()
        .map(Json)
        .ok_or_else(|| not_served(loaded, &id))
}

fn not_served(loaded: &LoadedModel, requested: &str) -> ApiError {
    let names: Vec<&str> = loaded.cards.iter().map(|c| c.id.as_str()).collect();
    ApiError::not_found(format!(
        "model {requested:?} is not served here; this server hosts {names:?}"
    ))
    .with_code("model_not_found")
}

pub async fn metrics(State(state): State<SharedState>) -> Response {
    use std::sync::atomic::Ordering::Relaxed;
    let gauges = match state.model.get() {
        Some(m) => {
            let s = match &m.engine {
                crate::Engine::Causal { scheduler, .. } => scheduler.stats(),
                crate::Engine::Encoder { queue, .. } => queue.stats(),
            };
            EngineGauges {
                waiting: s.waiting.load(Relaxed),
                running: s.running.load(Relaxed),
                cached_prompt_tokens: s.cached_prompt_tokens.load(Relaxed),
                kv_blocks_used: s.kv_blocks_used.load(Relaxed),
                kv_blocks_total: s.kv_blocks_total.load(Relaxed),
                preemptions: s.preemptions.load(Relaxed),
            }
        }
        None => EngineGauges::default(),
    };
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(&gauges),
    )
        .into_response()
}

pub(crate) fn check_model(loaded: &LoadedModel, requested: Option<&str>) -> Result<(), ApiError> {
    match requested {
        Some(m) if loaded.card(m).is_none() => Err(not_served(loaded, m)),
        _ => Ok(()),
    }
}

pub async fn completions(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    serve(
        state,
        headers,
        body,
        Endpoint::Completion,
        |r: &CompletionRequest| r.model.as_deref(),
        validate::completion,
    )
    .await
}

pub async fn chat_completions(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    serve(
        state,
        headers,
        body,
        Endpoint::Chat,
        |r: &ChatCompletionRequest| r.model.as_deref(),
        validate::chat,
    )
    .await
}

/// Parse, check the model, validate, then generate: the same for both
/// endpoints but for the request type and its validator.
async fn serve<R: DeserializeOwned>(
    state: SharedState,
    headers: HeaderMap,
    body: Body,
    endpoint: Endpoint,
    model_of: fn(&R) -> Option<&str>,
    validator: fn(&R, &validate::Limits) -> Result<ValidRequest, ApiError>,
) -> Response {
    let result = async {
        let c = &state.config;
        let request: R = read_json(&headers, body, c.max_body_bytes, c.max_json_depth).await?;
        let loaded = state.loaded()?;
        check_model(loaded, model_of(&request))?;
        let (_, limits) = loaded.causal()?;
        let valid = validator(&request, limits)?;
        Ok::<_, ApiError>(generate(state.clone(), loaded, valid, endpoint).await)
    };
    result.await.unwrap_or_else(IntoResponse::into_response)
}

#[derive(Clone, Copy)]
enum Endpoint {
    Completion,
    Chat,
}

/// One choice as it accumulates.
#[derive(Default, Clone)]
struct ChoiceState {
    tokens: Vec<u32>,
    logprobs: Vec<TokenLogprob>,
    finish: Option<FinishReason>,
    last_token_at: Option<Instant>,
}

/// The choices of one request, and what its envelopes share.
struct Job {
    id: String,
    created: u64,
    model: String,
    endpoint: Endpoint,
    prompt_tokens: usize,
    want_logprobs: Option<usize>,
    started: Instant,
    choices: Vec<ChoiceState>,
}

impl Job {
    fn usage(&self) -> Usage {
        let completion_tokens = self.choices.iter().map(|c| c.tokens.len()).sum();
        Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens,
            total_tokens: self.prompt_tokens + completion_tokens,
        }
    }

    /// Records an event; returns the new token (if any) for streaming.
    fn apply(
        &mut self,
        state: &SharedState,
        index: usize,
        event: SequenceEvent,
    ) -> Result<Option<Sampled>, ApiError> {
        let now = Instant::now();
        match event {
            SequenceEvent::Token(s) => {
                // The engine reports logprobs exactly when the request asked.
                let lp = s.logprobs.as_ref().map(|lp| TokenLogprob {
                    token_id: s.token,
                    logprob: lp.logprob,
                    top_logprobs: lp
                        .top
                        .iter()
                        .map(|&(token_id, logprob)| TopLogprob { token_id, logprob })
                        .collect(),
                });
                let choice = &mut self.choices[index];
                match choice.last_token_at {
                    None => state
                        .metrics
                        .time_to_first_token
                        .observe(now - self.started),
                    Some(t) => state.metrics.inter_token_latency.observe(now - t),
                }
                choice.last_token_at = Some(now);
                choice.tokens.push(s.token);
                choice.logprobs.extend(lp);
                state
                    .metrics
                    .completion_tokens
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok(Some(s))
            }
            SequenceEvent::Finished { reason, .. } => {
                self.choices[index].finish = Some(match reason {
                    ee_engine::FinishReason::Stop => FinishReason::Stop,
                    ee_engine::FinishReason::Length => FinishReason::Length,
                });
                Ok(None)
            }
            SequenceEvent::Failed(msg) => {
                Err(ApiError::internal(format!("generation failed: {msg}")))
            }
        }
    }

    fn logprobs_of(&self, lps: Vec<TokenLogprob>) -> Option<Logprobs> {
        self.want_logprobs.map(|_| Logprobs { content: lps })
    }

    fn completion_envelope(
        &self,
        choices: Vec<CompletionChoice>,
        usage: Option<Usage>,
    ) -> serde_json::Value {
        let r = CompletionResponse {
            id: self.id.clone(),
            object: "text_completion".into(),
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        };
        serde_json::to_value(r).unwrap_or_default()
    }

    fn chat_envelope(
        &self,
        object: &str,
        choices: Vec<ChatChoice>,
        usage: Option<Usage>,
    ) -> serde_json::Value {
        let r = ChatCompletionResponse {
            id: self.id.clone(),
            object: object.into(),
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        };
        serde_json::to_value(r).unwrap_or_default()
    }

    /// The whole answer (non-streaming).
    fn response(&self) -> serde_json::Value {
        let usage = Some(self.usage());
        let all = self.choices.iter().enumerate();
        match self.endpoint {
            Endpoint::Completion => self.completion_envelope(
                all.map(|(i, c)| {
                    self.completion_choice(i, c.tokens.clone(), c.logprobs.clone(), c.finish)
                })
                .collect(),
                usage,
            ),
            Endpoint::Chat => self.chat_envelope(
                "chat.completion",
                all.map(|(i, c)| ChatChoice {
                    index: i,
                    message: Some(AssistantTokens {
                        role: Some("assistant".into()),
                        content: None,
                        token_ids: c.tokens.clone(),
                    }),
                    delta: None,
                    logprobs: self.logprobs_of(c.logprobs.clone()),
                    finish_reason: c.finish,
                })
                .collect(),
                usage,
            ),
        }
    }

    fn completion_choice(
        &self,
        index: usize,
        token_ids: Vec<u32>,
        lps: Vec<TokenLogprob>,
        finish: Option<FinishReason>,
    ) -> CompletionChoice {
        CompletionChoice {
            index,
            text: String::new(),
            token_ids,
            logprobs: self.logprobs_of(lps),
            finish_reason: finish,
        }
    }

    /// One streamed chunk: a token of choice `index`, its finish, or (with
    /// `usage`) the final usage chunk, which has no choices.
    fn chunk(
        &self,
        index: usize,
        token: Option<&Sampled>,
        finish: Option<FinishReason>,
        usage: Option<Usage>,
    ) -> serde_json::Value {
        let token_ids: Vec<u32> = token.map(|s| s.token).into_iter().collect();
        // `apply` has already recorded this token's logprobs.
        let lps: Vec<TokenLogprob> = token
            .and_then(|_| self.choices[index].logprobs.last().cloned())
            .into_iter()
            .collect();
        let first = token.is_some() && self.choices[index].tokens.len() == 1;
        let with_choice = usage.is_none();
        match self.endpoint {
            Endpoint::Completion => {
                let choices =
                    with_choice.then(|| self.completion_choice(index, token_ids, lps, finish));
                self.completion_envelope(choices.into_iter().collect(), usage)
            }
            Endpoint::Chat => {
                let choices = with_choice.then(|| ChatChoice {
                    index,
                    message: None,
                    delta: Some(AssistantTokens {
                        role: first.then(|| "assistant".into()),
                        content: None,
                        token_ids,
                    }),
                    logprobs: token.and(self.logprobs_of(lps)),
                    finish_reason: finish,
                });
                self.chat_envelope(
                    "chat.completion.chunk",
                    choices.into_iter().collect(),
                    usage,
                )
            }
        }
    }
}

type Events = SelectAll<BoxStream<'static, (usize, SequenceEvent)>>;

/// Submits every choice; on failure the already-submitted ones are dropped,
/// which cancels them.
fn submit(loaded: &LoadedModel, v: &ValidRequest) -> Result<Events, ApiError> {
    let mut streams = Vec::new();
    for (p, prompt) in v.prompts.iter().enumerate() {
        for j in 0..v.n {
            let mut sampling = v.sampling.clone();
            // Distinct but reproducible draws for each of n choices.
            sampling.seed = sampling.seed.map(|s| s.wrapping_add(j as u64));
            let request = SequenceRequest {
                prompt: prompt.clone(),
                sampling,
                max_tokens: v.max_tokens[p],
                stop_token_ids: v.stop_token_ids.clone(),
                top_logprobs: v.top_logprobs,
                cache_prompt: v.cache_prompt,
            };
            let (scheduler, _) = loaded.causal()?;
            let rx = scheduler.submit(request).map_err(|e| match e {
                SubmitError::QueueFull(_) => ApiError::overloaded(),
                SubmitError::Stopped => ApiError::internal("the engine has stopped"),
            })?;
            let index = streams.len();
            streams.push(
                stream::unfold(rx, move |mut rx| async move {
                    rx.recv().await.map(|ev| ((index, ev), rx))
                })
                .boxed(),
            );
        }
    }
    Ok(stream::select_all(streams))
}

async fn generate(
    state: SharedState,
    loaded: &LoadedModel,
    v: ValidRequest,
    endpoint: Endpoint,
) -> Response {
    let events = match submit(loaded, &v) {
        Ok(e) => e,
        Err(e) => return e.into_response(),
    };
    let prompt_tokens = v.prompts.iter().map(Vec::len).sum();
    state
        .metrics
        .prompt_tokens
        .fetch_add(prompt_tokens as u64, std::sync::atomic::Ordering::Relaxed);
    let started = Instant::now();
    let job = Job {
        id: response_id(match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completion => "cmpl",
        }),
        created: unix_now(),
        model: loaded.name.clone(),
        endpoint,
        prompt_tokens,
        want_logprobs: v.top_logprobs,
        started,
        choices: vec![ChoiceState::default(); v.prompts.len() * v.n],
    };
    let deadline = started + Duration::from_secs(state.config.request_timeout_secs);
    if v.stream {
        stream_response(state, job, events, deadline, v.include_usage)
    } else {
        collect_response(state, job, events, deadline).await
    }
}

async fn collect_response(
    state: SharedState,
    mut job: Job,
    mut events: Events,
    deadline: Instant,
) -> Response {
    loop {
        match tokio::time::timeout_at(deadline, events.next()).await {
            Err(_) => return ApiError::timeout().into_response(),
            Ok(None) => break,
            Ok(Some((i, ev))) => {
                if let Err(e) = job.apply(&state, i, ev) {
                    return e.into_response();
                }
            }
        }
    }
    (StatusCode::OK, Json(job.response())).into_response()
}

/// SSE: `data: {chunk}` per token, a finish chunk per choice, an optional
/// usage chunk, then `data: [DONE]`. A client that goes away drops the
/// channel; the task then drops its receivers, which cancels the sequences.
fn stream_response(
    state: SharedState,
    mut job: Job,
    mut events: Events,
    deadline: Instant,
    include_usage: bool,
) -> Response {
    let (tx, rx) = mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        let data = |v: serde_json::Value| sse::data(&v);
        loop {
            let next = tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep_until(deadline) => {
                    let _ = tx.send(data(serde_json::to_value(ApiError::timeout().envelope()).unwrap_or_default())).await;
                    break;
                }
                next = events.next() => next,
            };
            let Some((i, ev)) = next else { break };
            let chunk = match job.apply(&state, i, ev) {
                Ok(Some(token)) => job.chunk(i, Some(&token), None, None),
                Ok(None) => job.chunk(i, None, job.choices[i].finish, None),
                Err(e) => {
                    let _ = tx
                        .send(data(serde_json::to_value(e.envelope()).unwrap_or_default()))
                        .await;
                    break;
                }
            };
            if tx.send(data(chunk)).await.is_err() {
                return;
            }
        }
        if include_usage {
            let _ = tx
                .send(data(job.chunk(0, None, None, Some(job.usage()))))
                .await;
        }
        let _ = tx.send(sse::done()).await;
    });
    sse::response(rx)
}
