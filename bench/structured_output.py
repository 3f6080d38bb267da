"""Structured output against free decoding, in one run: the proxy's
tokens/s on JSON-schema answers beside free answers of about the same
length to the same prompts, and how many server requests (restarts) each
structured answer took. A benchmark, not a test; CI does not run it.

    ee-server --model server.gguf --listen 127.0.0.1:8080 &
    ee proxy --bundle bundle --server http://127.0.0.1:8080 --listen 127.0.0.1:8081 &
    python3 bench/structured_output.py --proxy http://127.0.0.1:8081 --server http://127.0.0.1:8080
"""
import argparse
import json
import re
import time
import urllib.request


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    start = time.time()
    answer = json.load(urllib.request.urlopen(req))
    return answer, time.time() - start


def served(server):
    text = urllib.request.urlopen(server + "/metrics").read().decode()
    return sum(int(n) for n in re.findall(r'ee_requests_total\{status="200"\} (\d+)', text))


def string(n):
    return {"type": "string", "maxLength": n}


SCHEMAS = [
    ("Describe a person.", {"type": "object", "properties": {"name": string(20), "age": {"type": "integer"}},
                            "required": ["name", "age"]}),
    ("List fruits.", {"type": "object", "properties": {"fruits": {"type": "array", "items": string(12),
                                                                  "minItems": 1, "maxItems": 3}},
                      "required": ["fruits"]}),
    ("Make a to-do list.", {"type": "object", "properties": {"items": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {"id": {"type": "integer"}, "label": string(15)},
        "required": ["id", "label"]}}}, "required": ["items"]}),
    ("Describe a company.", {"type": "object", "properties": {"company": {"type": "object", "properties": {
        "ceo": {"type": "object", "properties": {"name": string(15), "since": {"type": "integer"}},
                "required": ["name", "since"]}}, "required": ["ceo"]}}, "required": ["company"]}),
]


def main():
    args = argparse.ArgumentParser()
    args.add_argument("--proxy", default="http://127.0.0.1:8081")
    args.add_argument("--server", default="http://127.0.0.1:8080")
    args.add_argument("--rounds", type=int, default=3)
    a = args.parse_args()
    url = a.proxy + "/v1/chat/completions"
    before = served(a.server)
    tokens, secs = 0, 0.0
    for question, schema in SCHEMAS * a.rounds:
        v, dt = post(url, {"messages": [{"role": "user", "content": question}], "max_tokens": 160,
                           "temperature": 0, "response_format": {
                               "type": "json_schema", "json_schema": {"name": "a", "schema": schema}}})
        tokens += v["usage"]["completion_tokens"]
        secs += dt
    answers = len(SCHEMAS) * a.rounds
    requests = served(a.server) - before
    constrained = tokens / secs
    tokens, secs = 0, 0.0
    for question, _ in SCHEMAS * a.rounds:
        v, dt = post(url, {"messages": [{"role": "user", "content": question + " Answer in JSON."}],
                           "max_tokens": 30, "temperature": 0, "ignore_eos": True})
        tokens += v["usage"]["completion_tokens"]
        secs += dt
    free = tokens / secs
    print(f"structured: {constrained:.1f} tok/s, {requests / answers:.1f} server requests per answer")
    print(f"free:       {free:.1f} tok/s")
    print(f"ratio:      {constrained / free:.2f}")


if __name__ == "__main__":
    main()
