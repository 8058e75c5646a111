"""httpx-sse, a second independent SSE client, against /events (driven by tests/clients.rs).

Usage: python sse_resume.py <gateway base URL>. Creates a generation, reads part of its stream,
drops the connection, and resumes with Last-Event-ID. Prints one JSON report on stdout. The
block between `# docs:` markers is quoted verbatim in docs/clients.md (a test checks that).
"""

import json
import sys
import time

# docs: httpx-sse
import httpx
from httpx_sse import connect_sse


def follow(client: httpx.Client, events_url: str, last_event_id: str | None = None):
    """Yields (id, token text) until the generation ends; survives dropped connections."""
    while True:
        headers = {"Last-Event-ID": last_event_id} if last_event_id is not None else {}
        try:
            with connect_sse(client, "GET", events_url, headers=headers) as source:
                if source.response.status_code == 204:
                    return  # we already had the last event
                for event in source.iter_sse():
                    if event.event == "token":
                        last_event_id = event.id
                        yield event.id, json.loads(event.data)["text"]
                    elif event.event == "done":
                        return
                    elif event.event == "error":
                        raise RuntimeError(json.loads(event.data)["message"])
                    elif event.event == "reconnect":
                        time.sleep((event.retry or 1000) / 1000)
                        break  # resume below, from last_event_id
        except httpx.TransportError:
            time.sleep(1)  # the connection dropped: resume from last_event_id
# end docs


base_url = sys.argv[1]
with httpx.Client(base_url=base_url, timeout=20) as client:
    created = client.post(
        "/v1/generations",
        json={
            "model": "tokenfan-mock",
            "messages": [{"role": "user", "content": "Tell me a story"}],
            "mock": {"tokens": 40, "interval_ms": 5},
        },
    ).json()
    events_url = created["events_url"]

    # Read ten tokens, then drop the connection (leaving the generator closes the stream).
    first = []
    for event_id, text in follow(client, events_url):
        first.append([event_id, text])
        if len(first) == 10:
            break
    # Resume where we stopped: the gateway replays from the next token, then goes live.
    rest = [[event_id, text] for event_id, text in follow(client, events_url, first[-1][0])]
    # Resuming after the last event: nothing left (204), the generator just ends.
    after_end = list(follow(client, events_url, str(len(first) + len(rest))))

print(json.dumps({"id": created["id"], "first": first, "rest": rest, "after_end": after_end}))
