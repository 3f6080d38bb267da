"""The official `openai` SDK's tool loop and structured output against the
proxy, with only `base_url` changed. Prints what it got as JSON for the Rust
test. The small default model chooses badly, so calls are forced with
`tool_choice`: this tests the plumbing, not the model's judgement."""
import json
import os

import openai
import pydantic

client = openai.OpenAI(base_url=os.environ["EE_BASE_URL"], api_key="unused")
tools = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                       "required": ["city"]},
    },
}, {
    "type": "function",
    "function": {"name": "get_time", "description": "The time now",
                 "parameters": {"type": "object", "properties": {}}},
}]
messages = [{"role": "user", "content": "What is the weather in Paris?"}]
out = {}

# 1. A forced call, then its result, then the answer.
first = client.chat.completions.create(
    model="ee-model", messages=messages, tools=tools, temperature=0, max_tokens=60,
    tool_choice={"type": "function", "function": {"name": "get_weather"}})
choice = first.choices[0]
call = choice.message.tool_calls[0]
out["call"] = {"finish_reason": choice.finish_reason, "name": call.function.name,
               "arguments": json.loads(call.function.arguments), "id": call.id,
               "content": choice.message.content}
messages.append(choice.message.model_dump(exclude_none=True))
messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"sky": "sunny", "celsius": 21})})
final = client.chat.completions.create(
    model="ee-model", messages=messages, tools=tools, tool_choice="none", temperature=0, max_tokens=40)
out["final"] = {"finish_reason": final.choices[0].finish_reason,
                "content": final.choices[0].message.content,
                "tool_calls": final.choices[0].message.tool_calls}

# 2. The same forced call, streamed: deltas accumulated by index.
calls = {}
finish = None
for chunk in client.chat.completions.create(
        model="ee-model", messages=messages[:1], tools=tools, temperature=0, max_tokens=60,
        tool_choice="required", stream=True):
    for c in chunk.choices:
        for d in c.delta.tool_calls or []:
            entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
            entry["name"] += (d.function.name or "") if d.function else ""
            entry["arguments"] += (d.function.arguments or "") if d.function else ""
        finish = c.finish_reason or finish
out["streamed"] = {"finish_reason": finish,
                   "calls": [{"name": v["name"], "arguments": json.loads(v["arguments"])}
                             for _, v in sorted(calls.items())]}

# 3. Structured output: a JSON schema through the SDK's own helper
# (strict, from a pydantic model), JSON mode, and a streamed schema.


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=20)
    country: str = pydantic.Field(max_length=20)
    population_millions: int = pydantic.Field(ge=0, le=100)


parsed = client.chat.completions.parse(
    model="ee-model", temperature=0, max_tokens=80, response_format=City,
    messages=[{"role": "user", "content": "Describe the capital of France."}])
out["parsed"] = parsed.choices[0].message.parsed.model_dump()
mode = client.chat.completions.create(
    model="ee-model", temperature=0, max_tokens=80, response_format={"type": "json_object"},
    messages=[{"role": "user", "content": "Give a dog's name and age as a JSON object with the keys name and age."}])
out["json_object"] = json.loads(mode.choices[0].message.content)
text = ""
for chunk in client.chat.completions.create(
        model="ee-model", temperature=0, max_tokens=80, stream=True,
        response_format={"type": "json_schema", "json_schema": {
            "name": "city", "schema": City.model_json_schema()}},
        messages=[{"role": "user", "content": "Describe the capital of France."}]):
    for c in chunk.choices:
        text += c.delta.content or ""
out["streamed_schema"] = json.loads(text)
print(json.dumps(out))
