"""Tool calls and reasoning through tokenfan with the official `openai` Python SDK, unmodified
(driven by tests/clients.rs): streamed tool calls whose arguments arrive in many chunks, parallel
calls, `tool_choice`, and the follow-up turn with the tool results.

Usage: python openai_tools.py <gateway base URL>. Prints one JSON report on stdout.
"""

import json
import sys

from openai import OpenAI

client = OpenAI(base_url=f"{sys.argv[1]}/v1", api_key="unused-tokenfan-holds-the-key")
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"Look something up ({name})",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}, "n": {"type": "integer"}},
                "required": ["query"],
            },
        },
    }
    for name in ("search", "lookup")
]
QUESTION = [{"role": "user", "content": "Find two things"}]
report = {}


def streamed(**kwargs):
    """Accumulates a streamed answer as an SDK user does: tool calls by index."""
    calls, text, reasoning, finish, chunks = {}, "", "", None, 0
    for chunk in client.chat.completions.create(model="gpt-4o-mini", stream=True, **kwargs):
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        delta = choice.delta
        text += delta.content or ""
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        for call in delta.tool_calls or []:
            chunks += 1
            entry = calls.setdefault(call.index, {"id": None, "name": None, "arguments": ""})
            if call.id:
                entry["id"] = call.id
            if call.function and call.function.name:
                entry["name"] = call.function.name
            if call.function and call.function.arguments:
                entry["arguments"] += call.function.arguments
        finish = choice.finish_reason or finish
    return {
        "text": text,
        "reasoning": reasoning,
        "finish_reason": finish,
        "tool_call_chunks": chunks,
        "tool_calls": [calls[index] for index in sorted(calls)],
    }


# Two parallel calls, with reasoning first.
report["parallel"] = streamed(
    messages=QUESTION,
    tools=TOOLS,
    extra_body={"mock": {"tool_calls": 2, "reasoning": 3, "interval_ms": 1}},
)
# tool_choice naming a function: the mock calls that one.
report["named"] = streamed(
    messages=QUESTION,
    tools=TOOLS,
    tool_choice={"type": "function", "function": {"name": "lookup"}},
    extra_body={"mock": {"interval_ms": 1}},
)
# tool_choice "none": text.
report["none"] = streamed(
    messages=QUESTION,
    tools=TOOLS,
    tool_choice="none",
    extra_body={"mock": {"tokens": 5, "interval_ms": 1}},
)

# Not streamed: the whole message, then the follow-up turn with each call's result.
first = client.chat.completions.create(
    model="gpt-4o-mini",
    messages=QUESTION,
    tools=TOOLS,
    tool_choice="required",
    extra_body={"mock": {"tool_calls": 2, "interval_ms": 1}},
)
message = first.choices[0].message
report["completion"] = {
    "finish_reason": first.choices[0].finish_reason,
    "content": message.content,
    "tool_calls": [
        {"id": call.id, "name": call.function.name, "arguments": call.function.arguments}
        for call in message.tool_calls or []
    ],
}
follow_up = QUESTION + [message.model_dump(exclude_none=True)] + [
    {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"found": call.function.name})}
    for call in message.tool_calls or []
]
report["follow_up"] = streamed(
    messages=follow_up, tools=TOOLS, extra_body={"mock": {"tokens": 6, "interval_ms": 1}}
)

# The model list, through the SDK's own call.
report["models"] = [model.id for model in client.models.list()]

print(json.dumps(report))
