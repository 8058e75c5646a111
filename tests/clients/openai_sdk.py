"""The official `openai` Python SDK, unmodified, against tokenfan (driven by tests/clients.rs).

Usage: python openai_sdk.py <gateway base URL>. Prints one JSON report on stdout. The blocks
between `# docs:` markers are quoted verbatim in docs/clients.md (a test checks that).
"""

import json
import sys

import openai

TOKENFAN_URL = sys.argv[1]
report = {}

# docs: openai-sdk
from openai import OpenAI

# Only for tokenfan's embedded mock LLM: its knobs ride along in the body like any
# provider-specific field. Leave it out with a real provider.
MOCK = {"mock": {"tokens": 12, "interval_ms": 2}}

client = OpenAI(base_url=f"{TOKENFAN_URL}/v1", api_key="unused-tokenfan-holds-the-key")

# Streaming: the usual chunks, plus the generation id for other viewers.
raw = client.chat.completions.with_raw_response.create(
    model="gpt-4o-mini",
    messages=[{"role": "user", "content": "Tell me a story"}],
    stream=True,
    stream_options={"include_usage": True},
    extra_body=MOCK,
)
generation_id = raw.headers["x-tokenfan-generation-id"]  # /v1/generations/{id}/events
text, usage = "", None
for chunk in raw.parse():
    if chunk.choices and chunk.choices[0].delta.content:
        text += chunk.choices[0].delta.content
    if chunk.usage:
        usage = chunk.usage

# Without streaming: one chat.completion once the generation has finished.
completion = client.chat.completions.create(
    model="gpt-4o-mini",
    messages=[{"role": "user", "content": "Tell me a story"}],
    extra_body=MOCK,
)
# end docs
report["stream"] = {
    "generation_id": generation_id,
    "text": text,
    "usage": usage.model_dump(exclude_none=True) if usage else None,
}
report["completion"] = {
    "id": completion.id,
    "text": completion.choices[0].message.content,
    "finish_reason": completion.choices[0].finish_reason,
    "usage": completion.usage.model_dump(exclude_none=True),
}

# docs: openai-sdk-errors
try:
    client.chat.completions.create(model="gpt-4o-mini", messages=[])
except openai.BadRequestError as error:  # HTTP 400, OpenAI's error body
    report["bad_request"] = {"status": error.status_code, "code": error.code}
# end docs

# A provider failure in the middle of a stream raises the SDK's APIError while iterating.
failing = {"mock": {"tokens": 10, "interval_ms": 1, "error_after": 3}}
received = ""
try:
    for chunk in client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Tell me a story"}],
        stream=True,
        extra_body=failing,
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            received += chunk.choices[0].delta.content
except openai.APIError as error:
    report["mid_stream_error"] = {
        "type": type(error).__name__,
        "message": error.message,
        "received": received,
    }

print(json.dumps(report))
