"""The official `openai` SDK against the proxy of an encrypted encoder, with
only `base_url` changed. Prints what it got as JSON for the Rust test."""
import json
import os

import openai

client = openai.OpenAI(base_url=os.environ["EE_BASE_URL"], api_key="unused")
texts = json.loads(os.environ["EE_TEXTS"])

# The SDK asks for base64 by default and decodes it itself.
batch = client.embeddings.create(model="ee-model", input=texts)
one = client.embeddings.create(model="ee-model", input=texts[0], encoding_format="float")
out = {
    "batch": [d.embedding for d in batch.data],
    "indices": [d.index for d in batch.data],
    "usage": batch.usage.prompt_tokens,
    "model": batch.model,
    "one": one.data[0].embedding,
}
try:
    client.embeddings.create(model="ee-model", input=texts[0], dimensions=10)
except openai.BadRequestError as e:
    out["dimensions_error"] = {"status": e.status_code, "param": e.body.get("param")}
print(json.dumps(out))
