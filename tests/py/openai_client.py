"""Drives the EE proxy with the official `openai` package, changing nothing
but base_url. Prints one JSON object of observations for the Rust test."""

import json
import os
import sys

import openai

client = openai.OpenAI(base_url=os.environ["EE_BASE_URL"], api_key="unused")
question = [{"role": "user", "content": "What is the capital of France?"}]
out = {"openai_version": openai.__version__}

out["models"] = [m.id for m in client.models.list().data]
model = out["models"][0]
retrieved = client.models.retrieve(model)
out["retrieved"] = {"id": retrieved.id, "context_length": getattr(retrieved, "context_length", None)}

r = client.chat.completions.create(model=model, messages=question, temperature=0, max_tokens=48)
out["chat"] = {
    "content": r.choices[0].message.content,
    "role": r.choices[0].message.role,
    "finish_reason": r.choices[0].finish_reason,
    "usage": r.usage.model_dump(),
}

pieces, usage, finish, chunks = [], None, None, 0
stream = client.chat.completions.create(
    model=model, messages=question, temperature=0, max_tokens=48,
    stream=True, stream_options={"include_usage": True},
)
for chunk in stream:
    chunks += 1
    if chunk.usage is not None:
        usage = chunk.usage.model_dump()
    for c in chunk.choices:
        pieces.append(c.delta.content or "")
        finish = c.finish_reason or finish
out["stream"] = {"content": "".join(pieces), "chunks": chunks, "usage": usage, "finish_reason": finish}

r = client.chat.completions.create(
    model=model, messages=question, temperature=0.8, seed=11, n=2, max_tokens=24,
)
out["n2"] = [c.message.content for c in r.choices]
r = client.chat.completions.create(
    model=model, messages=question, temperature=0.8, seed=11, n=2, max_tokens=24,
)
out["n2_again"] = [c.message.content for c in r.choices]

r = client.chat.completions.create(
    model=model, messages=question, temperature=0, max_tokens=48, stop=["Paris"],
)
out["stop"] = {"content": r.choices[0].message.content, "finish_reason": r.choices[0].finish_reason}

r = client.chat.completions.create(
    model=model, messages=question, temperature=0, max_tokens=12, logprobs=True, top_logprobs=3,
)
lp = r.choices[0].logprobs.content
out["logprobs"] = {
    "content": r.choices[0].message.content,
    "tokens": [t.token for t in lp],
    "logprobs": [t.logprob for t in lp],
    "top": [[a.token for a in t.top_logprobs] for t in lp],
    "completion_tokens": r.usage.completion_tokens,
}

r = client.completions.create(model=model, prompt="The capital of France is", temperature=0, max_tokens=8)
out["completion"] = {"text": r.choices[0].text, "finish_reason": r.choices[0].finish_reason}

try:
    client.chat.completions.create(model=model, messages=question, temperature=-1)
    out["bad"] = "accepted"
except openai.BadRequestError as e:
    out["bad"] = {"status": e.status_code, "message": e.message}

json.dump(out, sys.stdout)
