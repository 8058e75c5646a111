//! Real, unmodified clients against a real gateway: headless Chromium on the demo page (the
//! browser's own `EventSource`), the official `openai` Python SDK, and `httpx-sse`.
//!
//! Each test starts the gateway on an ephemeral port and runs a script from `tests/clients/` as
//! a child process, then checks the JSON report the script prints against the gateway's own
//! snapshot. The tools come from `.ci/install-client-deps`; a missing tool fails the test.

mod common;

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use common::Gateway;
use serde_json::Value;
use tokenfan::config::Secret;
use tokio::process::Command;

/// The key of the gateways started with API keys.
const API_KEY: &str = "sk-tokenfan-test";

/// Upper bound for one client script; each takes a few seconds.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(45);

fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

fn require(path: &Path, what: &str) -> PathBuf {
    assert!(
        path.exists(),
        "{what} not found at {}: run .ci/install-client-deps",
        path.display()
    );
    path.to_owned()
}

fn python() -> PathBuf {
    require(
        &clients_dir().join(".venv/bin/python"),
        "the Python venv with openai and httpx-sse",
    )
}

/// Runs a client script and parses the JSON report it prints as its last line.
async fn run(program: &Path, args: &[&str]) -> Value {
    let mut command = Command::new(program);
    command
        .args(args)
        .current_dir(clients_dir())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(SCRIPT_TIMEOUT, command.output())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{} {args:?} took over {SCRIPT_TIMEOUT:?}",
                program.display()
            )
        })
        .unwrap_or_else(|e| {
            panic!(
                "could not run {} ({e}): run .ci/install-client-deps",
                program.display()
            )
        });
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{} {args:?} failed ({}):\n{stderr}\n{stdout}",
        program.display(),
        output.status
    );
    let report = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(report).unwrap_or_else(|e| panic!("bad report ({e}): {stdout}\n{stderr}"))
}

/// The demo page in headless Chromium: it renders the generation's text in every viewer; when
/// the test cuts the viewers' connections mid-stream, the native `EventSource` reconnects by
/// itself with `Last-Event-ID` and nothing is lost or repeated; a viewer dropped and reopened
/// with the page's button resumes too; after `done` the browser stops asking.
#[tokio::test]
async fn demo_page_in_chromium_resumes_after_a_cut_and_stops_after_done() {
    require(Path::new("/usr/bin/chromium"), "Debian's chromium");
    require(
        &clients_dir().join("node_modules/playwright-core"),
        "playwright-core",
    );
    let gateway = Gateway::start_with(|c| {
        // The embedded mock, paced so that the generation is still running when the viewers
        // come back (Chromium waits 3 s before reconnecting).
        c.upstream.url = None;
        c.mock.tokens = 120;
        c.mock.interval = "50ms".parse().unwrap();
        // With keys, as in production: the page sends the key on backend calls only, and its
        // viewers use the generation's subscribe token.
        c.access.api_keys = vec![Secret::new(API_KEY)];
    })
    .await;
    let screenshot = artifacts_dir().join("demo.png");
    let _ = std::fs::remove_file(&screenshot);
    let node = which("node");
    let report = run(
        &node,
        &[
            "browser.mjs",
            &gateway.url(""),
            API_KEY,
            screenshot.to_str().unwrap(),
        ],
    )
    .await;

    assert_eq!(report["pageErrors"], serde_json::json!([]), "{report:#}");
    assert_eq!(report["title"], "tokenfan demo");
    let id = report["generationId"].as_str().unwrap();
    let snapshot = finished_with_key(&gateway, id).await;
    assert_eq!(snapshot["status"], "completed");
    assert_eq!(snapshot["token_count"], 120);

    // Every viewer shows exactly the generation's text: no gap, no repeat.
    let viewers = report["viewers"].as_array().unwrap();
    assert_eq!(viewers.len(), 3);
    for viewer in viewers {
        assert_eq!(viewer["state"], "done", "{viewer}");
        assert_eq!(viewer["anomalies"], 0, "{viewer}");
        assert_eq!(viewer["next"], 120, "{viewer}");
        assert_eq!(viewer["text"], snapshot["text"], "{viewer}");
    }
    let resumed = |n: usize| viewers[n]["resumed"].as_str().unwrap().to_owned();
    assert!(
        resumed(0).contains("reconnected by itself"),
        "{}",
        resumed(0)
    );
    assert!(
        resumed(2).contains("reconnected by itself"),
        "{}",
        resumed(2)
    );
    let reopened_label = format!("reopened, resumed after id {}", report["manualDropAfter"]);
    assert!(
        report["reopenedLabel"]
            .as_str()
            .unwrap()
            .contains(&reopened_label),
        "{report:#}"
    );

    // The network log, in order: three viewers open; viewer 3 is reopened by the page with
    // ?last_event_id=; the three streams are cut and each EventSource comes back by itself,
    // after Chromium's own reconnection delay, with a Last-Event-ID header no older than what
    // it had shown before the cut (viewer 3 on its reopened URL: the header wins over the
    // query). Nothing after done: 7 requests in all.
    assert_eq!(report["cut"], 3, "{report:#}");
    let requests = report["eventRequests"].as_array().unwrap();
    assert_eq!(requests.len(), 7, "{requests:#?}");
    assert_eq!(report["requestsAtDone"], 7);
    let token = report["subscribeToken"].as_str().unwrap();
    let events_path = format!("/v1/generations/{id}/events?token={token}");
    let reopen_path = format!("{events_path}&last_event_id={}", report["manualDropAfter"]);
    for request in &requests[..3] {
        assert_eq!(request["path"], events_path.as_str(), "{request}");
        assert!(request["lastEventId"].is_null(), "{request}");
    }
    assert_eq!(requests[3]["path"], reopen_path.as_str(), "{requests:#?}");
    assert!(requests[3]["lastEventId"].is_null(), "{requests:#?}");
    let shown: Vec<u64> = report["beforeCut"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_u64().unwrap())
        .collect();
    let lowest_shown = *shown.iter().min().unwrap();
    for request in &requests[4..] {
        let path = request["path"].as_str().unwrap();
        assert!(path == events_path || path == reopen_path, "{request}");
        let last: u64 = request["lastEventId"].as_str().unwrap().parse().unwrap();
        assert!(last >= lowest_shown && last < 119, "{request}");
        let after_cut = request["afterCutMs"].as_u64().unwrap();
        assert!(after_cut >= 2_000, "{request}");
    }

    // The guide's browser snippet, run in the page on a second generation.
    let snippet = &report["snippet"];
    let snippet_snapshot = finished_with_key(&gateway, snippet["id"].as_str().unwrap()).await;
    assert_eq!(snippet["text"], snippet_snapshot["text"], "{snippet}");
    assert_eq!(snippet["status"], "completed");
    assert_eq!(
        snippet["indices"],
        serde_json::json!((0..20).collect::<Vec<_>>())
    );

    assert!(
        report["figures"]["started"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    assert!(
        screenshot.exists(),
        "no screenshot at {}",
        screenshot.display()
    );
    gateway.shutdown().await;
}

/// The official `openai` Python SDK, unmodified, with tokenfan as its base URL.
#[tokio::test]
async fn openai_python_sdk_streams_completes_and_raises_its_own_errors() {
    let python = python();
    let gateway = Gateway::start().await;
    let report = run(&python, &["openai_sdk.py", &gateway.url("")]).await;

    let stream = &report["stream"];
    let id = stream["generation_id"].as_str().unwrap();
    let snapshot = gateway.wait_finished(id).await;
    assert_eq!(stream["text"], snapshot["text"], "{report:#}");
    assert_eq!(stream["usage"]["completion_tokens"], 12);
    assert_eq!(stream["usage"], snapshot["usage"]);

    let completion = &report["completion"];
    assert!(completion["id"]
        .as_str()
        .unwrap()
        .starts_with("chatcmpl-gen_"));
    assert!(!completion["text"].as_str().unwrap().is_empty());
    assert_eq!(completion["finish_reason"], "stop");
    assert_eq!(completion["usage"]["completion_tokens"], 12);

    assert_eq!(report["bad_request"]["status"], 400, "{report:#}");
    assert_eq!(report["bad_request"]["code"], "invalid_request");
    let failure = &report["mid_stream_error"];
    assert_eq!(failure["type"], "APIError", "{report:#}");
    assert!(failure["message"]
        .as_str()
        .unwrap()
        .contains("mock failure"));
    assert!(!failure["received"].as_str().unwrap().is_empty());
    gateway.shutdown().await;
}

/// The arguments of a tool call the mock made: JSON with its `query` and its position `n`.
fn mock_arguments(call: &Value) -> Value {
    let arguments: Value = serde_json::from_str(call["arguments"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("arguments are not JSON ({e}): {call}"));
    assert!(arguments["query"].is_string(), "{arguments}");
    arguments
}

/// Tool calls with the official `openai` Python SDK: parallel streamed calls whose arguments
/// arrive in many chunks (after reasoning), `tool_choice` naming a function or `"none"`, the
/// non-streamed message, and the follow-up turn with the tool results.
#[tokio::test]
async fn openai_python_sdk_streams_parallel_tool_calls_and_takes_the_follow_up() {
    let python = python();
    let gateway = Gateway::start().await;
    let report = run(&python, &["openai_tools.py", &gateway.url("")]).await;

    let parallel = &report["parallel"];
    assert_eq!(parallel["finish_reason"], "tool_calls", "{report:#}");
    assert_eq!(parallel["text"], "");
    assert!(!parallel["reasoning"].as_str().unwrap().is_empty());
    let calls = parallel["tool_calls"].as_array().unwrap();
    let names: Vec<_> = calls.iter().map(|call| call["name"].clone()).collect();
    assert_eq!(names, ["search", "lookup"]);
    for (n, call) in calls.iter().enumerate() {
        assert!(call["id"].as_str().unwrap().starts_with("call_"));
        assert_eq!(mock_arguments(call)["n"], n);
    }
    assert!(
        parallel["tool_call_chunks"].as_u64().unwrap() > 10,
        "{report:#}"
    );

    let named = &report["named"]["tool_calls"];
    assert_eq!(named.as_array().unwrap().len(), 1, "{report:#}");
    assert_eq!(named[0]["name"], "lookup");
    assert_eq!(report["none"]["finish_reason"], "stop");
    assert_eq!(report["none"]["tool_calls"], serde_json::json!([]));
    assert!(!report["none"]["text"].as_str().unwrap().is_empty());

    let completion = &report["completion"];
    assert_eq!(completion["finish_reason"], "tool_calls", "{report:#}");
    assert_eq!(completion["content"], Value::Null);
    let calls = completion["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 2);
    calls.iter().for_each(|call| drop(mock_arguments(call)));

    assert_eq!(report["models"], serde_json::json!(["tokenfan-mock"]));

    let follow_up = &report["follow_up"];
    assert_eq!(follow_up["finish_reason"], "stop", "{report:#}");
    assert!(!follow_up["text"].as_str().unwrap().is_empty());
    assert_eq!(follow_up["tool_calls"], serde_json::json!([]));
    gateway.shutdown().await;
}

/// Tool calls with the official `openai` npm SDK: its stream helper assembles two parallel
/// calls from their fragments; the follow-up turn with the results is answered in text.
#[tokio::test]
async fn openai_node_sdk_assembles_streamed_tool_calls() {
    let gateway = Gateway::start().await;
    let report = run(&which("node"), &["openai_tools.mjs", &gateway.url("")]).await;

    let stream = &report["stream"];
    assert_eq!(stream["finish_reason"], "tool_calls", "{report:#}");
    assert!(stream["fragments"].as_u64().unwrap() > 10, "{report:#}");
    let calls = stream["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 2, "{report:#}");
    for (n, call) in calls.iter().enumerate() {
        assert!(call["id"].as_str().unwrap().starts_with("call_"));
        assert_eq!(mock_arguments(call)["n"], n);
    }
    assert_eq!(report["follow_up"]["finish_reason"], "stop");
    assert!(!report["follow_up"]["content"].as_str().unwrap().is_empty());
    gateway.shutdown().await;
}

/// `httpx-sse`, a second SSE client: reads part of a stream, drops it, resumes with
/// `Last-Event-ID`, and gets the rest without a gap or a repeat; resuming after the end is 204.
#[tokio::test]
async fn httpx_sse_resumes_with_last_event_id() {
    let python = python();
    let gateway = Gateway::start().await;
    let report = run(&python, &["sse_resume.py", &gateway.url("")]).await;
    let snapshot = gateway.wait_finished(report["id"].as_str().unwrap()).await;

    let first = report["first"].as_array().unwrap();
    let rest = report["rest"].as_array().unwrap();
    assert_eq!(first.len(), 10);
    let all: Vec<_> = first.iter().chain(rest).collect();
    for (index, event) in all.iter().enumerate() {
        assert_eq!(event[0], index.to_string(), "ids count up without a gap");
    }
    let text: String = all.iter().map(|e| e[1].as_str().unwrap()).collect();
    assert_eq!(text, snapshot["text"]);
    assert_eq!(snapshot["token_count"], 40);
    assert_eq!(report["after_end"], serde_json::json!([]));
    gateway.shutdown().await;
}

/// The guide's fetch-based snippet in Node.js: follows a whole stream, resumes after an id,
/// and gets 204 (nothing) after the terminal event.
#[tokio::test]
async fn fetch_snippet_in_node_follows_and_resumes() {
    let gateway = Gateway::start_with(|c| c.access.api_keys = vec![Secret::new(API_KEY)]).await;
    let report = run(
        &which("node"),
        &["fetch_client.mjs", &gateway.url(""), API_KEY],
    )
    .await;
    let snapshot = finished_with_key(&gateway, report["id"].as_str().unwrap()).await;
    assert_eq!(
        report["indices"],
        serde_json::json!((0..30).collect::<Vec<_>>())
    );
    assert_eq!(report["whole"]["text"], snapshot["text"]);
    assert_eq!(report["whole"]["status"], "completed");
    assert_eq!(report["whole"]["token_count"], 30);
    let text = snapshot["text"].as_str().unwrap();
    let resumed = report["resumed"]["text"].as_str().unwrap();
    assert!(
        text.ends_with(resumed) && resumed.len() < text.len(),
        "{report:#}"
    );
    assert_eq!(report["afterEnd"], serde_json::json!({"text": ""}));
    gateway.shutdown().await;
}

/// docs/clients.md quotes the client code between `docs: NAME` and `end docs` markers in
/// tests/clients/ verbatim, so the guide shows exactly what the tests above run.
#[test]
fn guide_snippets_are_the_code_the_tests_run() {
    let guide_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/clients.md");
    let guide = std::fs::read_to_string(&guide_path).unwrap();
    let mut quoted = Vec::new();
    for entry in std::fs::read_dir(clients_dir()).unwrap() {
        let path = entry.unwrap().path();
        let is_code = path
            .extension()
            .is_some_and(|ext| ext == "py" || ext == "js" || ext == "mjs");
        if !is_code {
            continue;
        }
        let source = std::fs::read_to_string(&path).unwrap();
        for (name, snippet) in marked_snippets(&source) {
            assert!(
                guide.contains(&snippet),
                "docs/clients.md does not quote `{name}` from {} verbatim",
                path.display()
            );
            quoted.push(name);
        }
    }
    quoted.sort();
    assert_eq!(
        quoted,
        [
            "browser",
            "fetch",
            "httpx-sse",
            "openai-sdk",
            "openai-sdk-errors"
        ]
    );
}

/// (name, text) of each `# docs: NAME` / `// docs: NAME` … `end docs` block.
fn marked_snippets(source: &str) -> Vec<(String, String)> {
    let mut snippets = Vec::new();
    let mut open: Option<(String, Vec<&str>)> = None;
    for line in source.lines() {
        let marker = line.trim_start().trim_start_matches(['#', '/']).trim();
        match (&mut open, marker.strip_prefix("docs: ")) {
            (None, Some(name)) => open = Some((name.to_owned(), Vec::new())),
            (Some(_), _) if marker == "end docs" => {
                let (name, lines) = open.take().unwrap();
                snippets.push((name, lines.join("\n")));
            }
            (Some((_, lines)), _) => lines.push(line),
            (None, None) => {}
        }
    }
    assert!(open.is_none(), "a `docs:` block without `end docs`");
    snippets
}

/// The snapshot of a finished generation, read with [`API_KEY`].
/// What a person sees of a rolling deploy with a shared store: Chromium on the demo page behind
/// a readiness-following load balancer, two instances, SIGTERM to the generation's owner.
#[tokio::test]
async fn demo_page_viewers_move_to_another_instance_when_theirs_drains_and_lose_nothing() {
    require(Path::new("/usr/bin/chromium"), "Debian's chromium");
    require(
        &clients_dir().join("node_modules/playwright-core"),
        "playwright-core",
    );
    // The demo page asks for the mock's defaults: long enough to watch the hand-off.
    let mock = common::start_mock_with(tokenfan::upstream::mock::MockConfig {
        tokens: 120,
        interval: "40ms".parse().unwrap(),
        first_token: Duration::ZERO,
    })
    .await;
    let redis = common::redis::RedisServer::start().await;
    let cluster = common::cluster::Cluster::start_on(redis, mock, 2, &[], &[]).await;
    let screenshot = artifacts_dir().join("demo-handoff.png");
    let owner_pid = cluster.instances[0].pid().to_string();
    let report = run(
        &which("node"),
        &[
            "browser_handoff.mjs",
            &cluster.bases().join(","),
            &owner_pid,
            screenshot.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(report["pageErrors"], serde_json::json!([]), "{report:#}");
    let id = report["generationId"].as_str().unwrap();
    let (_, snapshot) = cluster.snapshot(1, id).await;
    assert_eq!(snapshot["status"], "completed", "{snapshot}");
    for viewer in report["viewers"].as_array().unwrap() {
        assert_eq!(viewer["state"], "done", "{viewer}");
        assert_eq!(viewer["anomalies"], 0, "{viewer}");
        assert_eq!(viewer["next"], 120, "{viewer}");
        assert_eq!(viewer["text"], snapshot["text"], "{viewer}");
        assert_eq!(viewer["instance"], "· via i1 (was i0)", "{viewer}");
    }
    assert!(screenshot.exists());
}

fn artifacts_dir() -> PathBuf {
    let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    artifacts
}

async fn finished_with_key(gateway: &Gateway, id: &str) -> Value {
    let url = gateway.url(&format!("/v1/generations/{id}"));
    tokio::time::timeout(common::WAIT, async {
        loop {
            let response = gateway.http.get(&url).bearer_auth(API_KEY).send().await;
            let snapshot: Value = response.unwrap().json().await.unwrap();
            if snapshot["status"] != "running" {
                return snapshot;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("generation did not finish in time")
}

/// The first `name` on PATH, or a failure naming the install script.
fn which(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
        .unwrap_or_else(|| panic!("{name} not found on PATH: run .ci/install-client-deps"))
}
