//! The store on Redis (`--store-url redis://…`, `rediss://…` for TLS).
//!
//! Layout, per generation, every key sharing the hash tag `{gen_…}` (one cluster slot):
//! - `tf:{id}:m`, a hash: `owner`, `status`, and at the end `token_count`, `finish_reason`,
//!   `usage`, `error_code`, `error_message`;
//! - `tf:{id}:s`, a Stream: the log, entry `i` at stream id `i-1`, its bytes in field `d`, so a
//!   read from index `i` is `XRANGE tf:{id}:s i-1 +` and the log's length is `XLEN`;
//! - `tf:{id}:l`, the owner's lease (its name, with a TTL);
//! - `tf:{id}:live`, the pub/sub channel of the live feed ([`super::wire`]).
//!
//! Every write by an owner is a Lua script (check the lease and the expected index, append,
//! renew the lease when due, publish), so the log and the live feed never disagree about order,
//! and an owner that lost its lease can never write again (fencing). Tokens ready together go
//! in one call, and so do the appends of up to 64 generations on a single server; the
//! instance's writes of one moment are one pipeline (one round trip). On a cluster each
//! generation's keys are in their own slot, so each takes its own call. Idempotency keys are `tf:idem:{scope}:{key}` (`SET NX GET`), cancel requests go to
//! an owner over `tf:ctl:{owner}`. Keys expire `retention` after the end, `max_age` after the
//! start while running.
//!
//! Two connections per instance, which reconnect by themselves: one for commands, one RESP3
//! connection for every live feed of the instance, resubscribed after a reconnect (the
//! replicas are told to read the log again then). On a single server they are redis-rs
//! `ConnectionManager`s; on a Redis Cluster (found by asking the node the URL names), cluster
//! connections, with sharded pub/sub (`SPUBLISH`/`SSUBSCRIBE`) for the live feeds, so a
//! generation's messages stay on the shard that holds its keys.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use redis::{
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClientBuilder,
    cluster_async::ClusterConnection,
    streams::StreamRangeReply,
    AsyncCommands, Cmd, ErrorKind, Pipeline, ProtocolVersion, PushInfo, PushKind, RedisFuture,
    RedisResult, Script, ScriptInvocation, ServerErrorKind, Value,
};
use tokio::sync::mpsc;

use super::{
    listeners::{self, Listener, Listeners, OnLast},
    wire, Claimed, End, IdempotencyClaim, Lifetimes, LiveSender, Meta, Store, StoreError, Watch,
    Write, WriteOp, Written,
};

/// Appends entries to several generations of one owner, each at its expected index and only
/// if the owner holds (or may take) its lease; one answer `{code, number}` per generation. The
/// log's length is the Stream's (`XLEN`), so no counter is written per token, and the lease is
/// written only when asked (about three times per lease) or when free: with one token, this is
/// five commands (`HGET`, `GET`, `XLEN`, `XADD`, `PUBLISH`). A generation with no entries only
/// has its checks made and its lease renewed.
/// KEYS: meta, stream, lease of each generation. ARGV: owner, lease ms, publish command
/// (`PUBLISH`, or `SPUBLISH` on a cluster), then per generation: first, renew (`1`/`0`),
/// channel, live message, entry count, entries….
const APPEND: &str = r"
local owner, lease, publish = ARGV[1], ARGV[2], ARGV[3]
local answers = {}
local at = 4
for k = 1, #KEYS, 3 do
  local meta, stream, held = KEYS[k], KEYS[k + 1], KEYS[k + 2]
  local first, renew, channel, message = tonumber(ARGV[at]), ARGV[at + 1], ARGV[at + 2], ARGV[at + 3]
  local count = tonumber(ARGV[at + 4])
  local from = at + 5
  at = from + count
  local answer = {'ok', 0}
  local status = redis.call('HGET', meta, 'status')
  if not status then
    answer = {'missing', 0}
  elseif status ~= 'running' then
    answer = {'fenced', 0}
  else
    local holder = redis.call('GET', held)
    local nxt = redis.call('XLEN', stream)
    if holder and holder ~= owner then
      answer = {'fenced', 0}
    elseif first ~= nxt then
      answer = {'expected', nxt}
    else
      for i = 0, count - 1 do
        redis.call('XADD', stream, (first + i) .. '-1', 'd', ARGV[from + i])
      end
      if first == 0 and count > 0 then
        local ttl = redis.call('PTTL', meta)
        if ttl > 0 then redis.call('PEXPIRE', stream, ttl) end
      end
      if renew == '1' or not holder then
        redis.call('SET', held, owner, 'PX', lease)
      end
      if count > 0 then redis.call(publish, channel, message) end
    end
  end
  answers[#answers + 1] = answer
end
return answers
";

/// Ends a running generation: by its owner at the expected length, or (owner '') by anyone
/// once no lease is held. KEYS: meta, stream, lease. ARGV: owner, token_count, retention ms,
/// channel, live message, publish command, then field/value pairs of the end.
const FINISH: &str = r"
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing', 0} end
if status ~= 'running' then return {'fenced', 0} end
local holder = redis.call('GET', KEYS[3])
local nxt = redis.call('XLEN', KEYS[2])
if ARGV[1] == '' then
  if holder then return {'leased', 0} end
else
  if holder and holder ~= ARGV[1] then return {'fenced', 0} end
  if tonumber(ARGV[2]) ~= nxt then return {'expected', nxt} end
end
redis.call('HSET', KEYS[1], 'token_count', nxt)
for i = 7, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('DEL', KEYS[3])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call(ARGV[6], ARGV[4], ARGV[5])
return {'ok', 0}
";

struct Scripts {
    append: Script,
    finish: Script,
}

pub struct RedisStore {
    lifetimes: Lifetimes,
    commands: Connection,
    feed: Connection,
    /// Shared with the push handler of the feed connection.
    listeners: Arc<Mutex<Listeners>>,
    scripts: Scripts,
}

/// A single server's or a cluster's connection: the commands are the same.
#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(connection) => connection.req_packed_command(cmd),
            Self::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(connection) => connection.req_packed_commands(pipeline, offset, count),
            Self::Cluster(connection) => connection.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(connection) => connection.get_db(),
            Self::Cluster(connection) => connection.get_db(),
        }
    }
}

impl Connection {
    /// The command a script publishes a live message with.
    fn publish_command(&self) -> &'static str {
        match self {
            Self::Single(_) => "PUBLISH",
            Self::Cluster(_) => "SPUBLISH",
        }
    }

    /// Subscribes to a channel; `sharded` (a generation's live feed) uses sharded pub/sub on a
    /// cluster.
    async fn subscribe(&mut self, channel: &str, sharded: bool) -> RedisResult<()> {
        match self {
            Self::Single(connection) => connection.subscribe(channel).await,
            Self::Cluster(connection) if sharded => connection.ssubscribe(channel).await,
            Self::Cluster(connection) => connection.subscribe(channel).await,
        }
    }

    async fn unsubscribe(&mut self, channel: &str, sharded: bool) -> RedisResult<()> {
        match self {
            Self::Single(connection) => connection.unsubscribe(channel).await,
            Self::Cluster(connection) if sharded => connection.sunsubscribe(channel).await,
            Self::Cluster(connection) => connection.unsubscribe(channel).await,
        }
    }
}

fn meta_key(id: &str) -> String {
    format!("tf:{{{id}}}:m")
}
fn stream_key(id: &str) -> String {
    format!("tf:{{{id}}}:s")
}
fn lease_key(id: &str) -> String {
    format!("tf:{{{id}}}:l")
}
fn idempotency_key(claim: &IdempotencyClaim) -> String {
    format!("tf:idem:{}:{}", claim.scope, claim.key)
}
fn live_channel(id: &str) -> String {
    format!("tf:{{{id}}}:live")
}
const CONTROL_PREFIX: &str = "tf:ctl:";
fn control_channel(owner: &str) -> String {
    format!("{CONTROL_PREFIX}{owner}")
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longer than a `CLIENT PAUSE` or a failover usually lasts; a write that times out is retried,
/// and the expected-index check makes a retried append that had landed harmless.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Asks the node the URL names whether it is part of a cluster.
async fn is_cluster(client: &redis::Client) -> Result<bool, StoreError> {
    let mut connection = client.get_multiplexed_async_connection().await?;
    let info: String = redis::cmd("INFO")
        .arg("cluster")
        .query_async(&mut connection)
        .await?;
    Ok(info.lines().any(|line| line.trim() == "cluster_enabled:1"))
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

impl From<redis::RedisError> for StoreError {
    fn from(error: redis::RedisError) -> Self {
        StoreError::Unavailable(error.to_string())
    }
}

impl RedisStore {
    pub async fn open(url: &str, lifetimes: Lifetimes) -> Result<Self, StoreError> {
        let config_error = |e: redis::RedisError| StoreError::Config(e.to_string());
        let client = redis::Client::open(url).map_err(config_error)?;
        let info = client.get_connection_info().clone();
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let info = info.set_redis_settings(settings);
        let listeners = Arc::new(Mutex::new(Listeners::default()));
        let weak = Arc::downgrade(&listeners);
        let push = move |push: PushInfo| {
            dispatch(&weak, push);
            Ok::<(), std::convert::Infallible>(())
        };
        let (commands, feed) = if is_cluster(&client).await? {
            tracing::info!("the store is a Redis Cluster: sharded pub/sub for live feeds");
            let builder = || {
                ClusterClientBuilder::new(vec![info.clone()])
                    .use_protocol(ProtocolVersion::RESP3)
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(RESPONSE_TIMEOUT)
            };
            let commands = builder().build().map_err(config_error)?;
            let feed = builder().push_sender(push).build().map_err(config_error)?;
            (
                Connection::Cluster(commands.get_async_connection().await?),
                Connection::Cluster(feed.get_async_connection().await?),
            )
        } else {
            let client = redis::Client::open(info).map_err(config_error)?;
            let config = || {
                ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(RESPONSE_TIMEOUT))
                    .set_max_delay(Duration::from_secs(1))
            };
            let commands = client.get_connection_manager_with_config(config()).await?;
            let feed = client
                .get_connection_manager_with_config(
                    config()
                        .set_automatic_resubscription()
                        .set_push_sender(push),
                )
                .await?;
            (Connection::Single(commands), Connection::Single(feed))
        };
        Ok(Self {
            lifetimes,
            commands,
            feed,
            listeners,
            scripts: Scripts {
                append: Script::new(APPEND),
                finish: Script::new(FINISH),
            },
        })
    }

    /// Sends `writes` to a single server: one pipeline of script calls, each appending for up
    /// to [`GENERATIONS_PER_CALL`] generations, so a burst of every generation's token is one
    /// round trip and a few script runs, not one of each per generation.
    async fn write_pipelined(
        &self,
        owner: &str,
        writes: &[Write<'_>],
    ) -> Vec<Result<Written, StoreError>> {
        let runs = runs(writes);
        let calls: Vec<_> = runs
            .iter()
            .map(|run| self.call(owner, &writes[run.clone()]))
            .collect();
        let mut replies = match self.pipeline(calls.iter().collect()).await {
            Ok(replies) => replies,
            Err(error) => {
                let error = StoreError::from(error);
                return writes.iter().map(|_| Err(error.clone())).collect();
            }
        };
        // After a restart the server has forgotten the scripts: load them, then make again the
        // calls it refused (they did nothing).
        let refused: Vec<usize> = (0..replies.len())
            .filter(|&i| matches!(&replies[i], Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript)))
            .collect();
        if !refused.is_empty() {
            let retried = async {
                let mut connection = self.commands.clone();
                self.scripts.append.load_async(&mut connection).await?;
                self.scripts.finish.load_async(&mut connection).await?;
                self.pipeline(refused.iter().map(|&i| &calls[i]).collect())
                    .await
            }
            .await;
            match retried {
                Ok(again) => {
                    for (i, reply) in refused.into_iter().zip(again) {
                        replies[i] = reply;
                    }
                }
                Err(error) => {
                    for i in refused {
                        replies[i] = Err(error.clone());
                    }
                }
            }
        }
        let mut answers = Vec::with_capacity(writes.len());
        for (run, reply) in runs.into_iter().zip(replies) {
            let count = run.len();
            match reply
                .map_err(StoreError::from)
                .and_then(|reply| parse_answers(&writes[run], reply))
            {
                Ok(written) => answers.extend(written.into_iter().map(Ok)),
                Err(error) => {
                    answers.extend((0..count).map(|_| Err(error.clone())));
                }
            }
        }
        answers
    }

    /// One pipeline of script calls; an error answer of one call is its own.
    async fn pipeline(
        &self,
        calls: Vec<&ScriptInvocation<'_>>,
    ) -> RedisResult<Vec<RedisResult<Value>>> {
        let mut pipe = redis::pipe();
        for call in calls {
            pipe.invoke_script(call);
        }
        pipe.ignore_errors()
            .query_async(&mut self.commands.clone())
            .await
    }

    /// The script call that answers `writes`: a run of appends (one generation each, see
    /// [`runs`]), or one end.
    fn call(&self, owner: &str, writes: &[Write<'_>]) -> ScriptInvocation<'_> {
        if let [Write {
            id,
            op: WriteOp::Finish(end),
        }] = writes
        {
            return self.finish_invocation(id, owner, end);
        }
        let mut invocation = self.scripts.append.prepare_invoke();
        invocation
            .arg(owner)
            .arg(millis(self.lifetimes.lease))
            .arg(self.commands.publish_command());
        for write in writes {
            let WriteOp::Append {
                first,
                entries,
                renew,
            } = &write.op
            else {
                continue;
            };
            let id = write.id;
            invocation
                .key(meta_key(id))
                .key(stream_key(id))
                .key(lease_key(id))
                .arg(*first)
                .arg(if *renew { "1" } else { "0" })
                .arg(live_channel(id))
                .arg(wire::entries(*first, entries).as_ref())
                .arg(entries.len());
            for entry in entries {
                invocation.arg(entry.as_ref());
            }
        }
        invocation
    }

    /// The `FINISH` call: by `owner`, or by anyone once the lease is gone (`owner` empty).
    fn finish_invocation(&self, id: &str, owner: &str, end: &End) -> ScriptInvocation<'_> {
        let mut invocation = self.scripts.finish.prepare_invoke();
        invocation
            .key(meta_key(id))
            .key(stream_key(id))
            .key(lease_key(id))
            .arg(owner)
            .arg(end.token_count)
            .arg(millis(self.lifetimes.retention))
            .arg(live_channel(id))
            .arg(wire::ended().as_ref())
            .arg(self.commands.publish_command())
            .arg("status")
            .arg(&end.status);
        let optional = [
            ("finish_reason", &end.finish_reason),
            ("usage", &end.usage),
            ("error_code", &end.error_code),
            ("error_message", &end.error_message),
        ];
        for (field, value) in optional {
            if let Some(value) = value {
                invocation.arg(field).arg(value);
            }
        }
        invocation
    }

    async fn subscribe(
        &self,
        channel: String,
        listener: Listener,
    ) -> Result<Box<dyn Watch>, StoreError> {
        let sharded = matches!(listener, Listener::Live(_));
        let on_last = self.unsubscriber(sharded);
        let (registration, first) =
            Listeners::add(&self.listeners, &channel, listener, Some(on_last));
        if first {
            self.feed.clone().subscribe(&channel, sharded).await?;
        }
        Ok(registration)
    }

    /// Unsubscribes a channel whose last listener went, unless one came back meanwhile.
    fn unsubscriber(&self, sharded: bool) -> OnLast {
        let feed = self.feed.clone();
        let weak = Arc::downgrade(&self.listeners);
        Box::new(move |channel: &str| {
            let (mut feed, weak, channel) = (feed.clone(), weak.clone(), channel.to_owned());
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let wanted = weak
                        .upgrade()
                        .is_some_and(|shared| listeners::lock(&shared).is_wanted(&channel));
                    if !wanted {
                        let _ = feed.unsubscribe(&channel, sharded).await;
                    }
                });
            }
        })
    }
}

/// Routes one push message of the feed connection; never waits (it runs on the connection's
/// reader).
fn dispatch(listeners: &Weak<Mutex<Listeners>>, push: PushInfo) {
    let Some(listeners) = listeners.upgrade() else {
        return;
    };
    let listeners = listeners::lock(&listeners);
    match push.kind {
        PushKind::Message | PushKind::SMessage => {
            let mut data = push.data.into_iter();
            let (Some(Value::BulkString(channel)), Some(Value::BulkString(message))) =
                (data.next(), data.next())
            else {
                return;
            };
            let Ok(channel) = String::from_utf8(channel) else {
                return;
            };
            if channel.starts_with(CONTROL_PREFIX) {
                if let Ok(id) = std::str::from_utf8(&message) {
                    listeners.request(&channel, id);
                }
            } else if let Some(event) = wire::decode(&Bytes::from(message)) {
                listeners.publish(&channel, &event);
            } else {
                tracing::warn!(%channel, "a malformed live feed message was ignored");
            }
        }
        PushKind::Disconnection => listeners.resync_all(),
        _ => {}
    }
}

/// Most generations in one append script call: one call stays short for Redis, which serves
/// nobody else while it runs.
const GENERATIONS_PER_CALL: usize = 64;
/// Most entries in one append script call.
const ENTRIES_PER_CALL: usize = 1024;

/// Splits writes into script calls: each end alone, appends in runs of a bounded size.
fn runs(writes: &[Write<'_>]) -> Vec<std::ops::Range<usize>> {
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    let mut entries_in_run = 0;
    for (i, write) in writes.iter().enumerate() {
        let entries = match &write.op {
            WriteOp::Append { entries, .. } => entries.len(),
            WriteOp::Finish(_) => {
                runs.push(i..i + 1);
                entries_in_run = usize::MAX;
                continue;
            }
        };
        match runs.last_mut() {
            Some(run)
                if entries_in_run != usize::MAX
                    && run.len() < GENERATIONS_PER_CALL
                    && entries_in_run + entries <= ENTRIES_PER_CALL =>
            {
                run.end = i + 1;
                entries_in_run += entries;
            }
            _ => {
                runs.push(i..i + 1);
                entries_in_run = entries;
            }
        }
    }
    runs
}

/// Reads the answers of a call [`RedisStore::call`] made for `writes`.
fn parse_answers(writes: &[Write<'_>], reply: Value) -> Result<Vec<Written>, StoreError> {
    let protocol = |e: redis::ParsingError| StoreError::Protocol(e.to_string());
    let pairs: Vec<(String, u64)> = match writes {
        [Write {
            op: WriteOp::Finish(_),
            ..
        }] => vec![redis::from_redis_value(reply).map_err(protocol)?],
        _ => redis::from_redis_value(reply).map_err(protocol)?,
    };
    if pairs.len() != writes.len() {
        return Err(StoreError::Protocol(format!(
            "{} answers for {} writes",
            pairs.len(),
            writes.len()
        )));
    }
    pairs.into_iter().map(written).collect()
}

/// Parses a script's `{code, number}` answer.
fn written(reply: (String, u64)) -> Result<Written, StoreError> {
    match reply.0.as_str() {
        "ok" => Ok(Written::Done),
        "missing" => Ok(Written::Missing),
        "fenced" => Ok(Written::Fenced),
        "leased" => Ok(Written::Leased),
        "expected" => Ok(Written::Expected { next: reply.1 }),
        other => Err(StoreError::Protocol(format!("script answered {other:?}"))),
    }
}

impl Store for RedisStore {
    fn create<'a>(&'a self, id: &'a str, owner: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let meta = meta_key(id);
            // Not a transaction: nobody knows this id before it is returned.
            redis::pipe()
                .hset_multiple(&meta, &[("owner", owner), ("status", "running")])
                .ignore()
                .pexpire(&meta, millis(self.lifetimes.max_age) as i64)
                .ignore()
                .set_options(
                    lease_key(id),
                    owner,
                    redis::SetOptions::default()
                        .with_expiration(redis::SetExpiry::PX(millis(self.lifetimes.lease))),
                )
                .ignore()
                .exec_async(&mut self.commands.clone())
                .await?;
            Ok(())
        })
    }

    fn discard<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let keys = [meta_key(id), stream_key(id), lease_key(id)];
            let _: () = self.commands.clone().del(&keys).await?;
            Ok(())
        })
    }

    fn claim_idempotency<'a>(
        &'a self,
        claim: &'a IdempotencyClaim,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Claimed>, StoreError>> {
        Box::pin(async move {
            let key = idempotency_key(claim);
            let value = format!("{:016x}:{id}", claim.body_hash);
            let ttl = millis(self.lifetimes.max_age + self.lifetimes.retention);
            let previous: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(&value)
                .arg("NX")
                .arg("GET")
                .arg("PX")
                .arg(ttl)
                .query_async(&mut self.commands.clone())
                .await?;
            let Some(previous) = previous else {
                return Ok(None);
            };
            let parsed = previous.split_once(':').and_then(|(hash, id)| {
                Some(Claimed {
                    body_hash: u64::from_str_radix(hash, 16).ok()?,
                    id: id.to_owned(),
                })
            });
            parsed
                .map(Some)
                .ok_or_else(|| StoreError::Protocol(format!("idempotency key {key} holds junk")))
        })
    }

    fn release_idempotency<'a>(
        &'a self,
        claim: &'a IdempotencyClaim,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let ttl = millis(self.lifetimes.retention) as i64;
            let _: bool = self
                .commands
                .clone()
                .pexpire(idempotency_key(claim), ttl)
                .await?;
            Ok(())
        })
    }

    fn write<'a>(
        &'a self,
        owner: &'a str,
        writes: &'a [Write<'a>],
    ) -> BoxFuture<'a, Vec<Result<Written, StoreError>>> {
        Box::pin(async move {
            match self.commands {
                Connection::Single(_) => self.write_pipelined(owner, writes).await,
                // Keys of different generations live in different slots: one call each, sent
                // together over the cluster connection.
                Connection::Cluster(_) => {
                    let calls = writes.iter().map(|write| async move {
                        let writes = std::slice::from_ref(write);
                        let reply: Value = self
                            .call(owner, writes)
                            .invoke_async(&mut self.commands.clone())
                            .await?;
                        let mut answers = parse_answers(writes, reply)?;
                        answers
                            .pop()
                            .ok_or_else(|| StoreError::Protocol("no answer".into()))
                    });
                    futures_util::future::join_all(calls).await
                }
            }
        })
    }

    fn finish<'a>(
        &'a self,
        id: &'a str,
        owner: Option<&'a str>,
        end: &'a End,
    ) -> BoxFuture<'a, Result<Written, StoreError>> {
        Box::pin(async move {
            let invocation = self.finish_invocation(id, owner.unwrap_or(""), end);
            written(invocation.invoke_async(&mut self.commands.clone()).await?)
        })
    }

    fn meta<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Meta>, StoreError>> {
        Box::pin(async move {
            let (mut fields, lease_ttl, next): (HashMap<String, String>, i64, u64) = redis::pipe()
                .hgetall(meta_key(id))
                .pttl(lease_key(id))
                .xlen(stream_key(id))
                .query_async(&mut self.commands.clone())
                .await?;
            let Some(status) = fields.remove("status") else {
                return Ok(None);
            };
            let number = |value: Option<String>| value.and_then(|v| v.parse::<u64>().ok());
            let end = (status != "running").then(|| End {
                status: status.clone(),
                token_count: number(fields.remove("token_count")).unwrap_or(next),
                finish_reason: fields.remove("finish_reason"),
                usage: fields.remove("usage"),
                error_code: fields.remove("error_code"),
                error_message: fields.remove("error_message"),
            });
            Ok(Some(Meta {
                owner: fields.remove("owner").unwrap_or_default(),
                status,
                next,
                leased: lease_ttl > 0 || lease_ttl == -1,
                end,
            }))
        })
    }

    fn read<'a>(
        &'a self,
        id: &'a str,
        from: u64,
        max: usize,
    ) -> BoxFuture<'a, Result<Vec<Bytes>, StoreError>> {
        Box::pin(async move {
            let reply: StreamRangeReply = self
                .commands
                .clone()
                .xrange_count(stream_key(id), format!("{from}-1"), "+", max)
                .await?;
            let mut entries = Vec::with_capacity(reply.ids.len());
            for (expected, entry) in (from..).zip(reply.ids) {
                // A hole (entries the store lost) ends the read: nothing after it is delivered.
                if entry.id != format!("{expected}-1") {
                    break;
                }
                match entry.map.get("d") {
                    Some(Value::BulkString(bytes)) => entries.push(Bytes::copy_from_slice(bytes)),
                    _ => {
                        return Err(StoreError::Protocol(format!(
                            "log entry {expected} of {id} has no data"
                        )))
                    }
                }
            }
            Ok(entries)
        })
    }

    fn watch<'a>(
        &'a self,
        id: &'a str,
        sender: LiveSender,
    ) -> BoxFuture<'a, Result<Box<dyn Watch>, StoreError>> {
        Box::pin(self.subscribe(live_channel(id), Listener::Live(sender)))
    }

    fn request_cancel<'a>(
        &'a self,
        owner: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let receivers: u64 = self
                .commands
                .clone()
                .publish(control_channel(owner), id)
                .await?;
            Ok(receivers > 0)
        })
    }

    fn listen_for_cancels<'a>(
        &'a self,
        owner: &'a str,
        sender: mpsc::Sender<String>,
    ) -> BoxFuture<'a, Result<Box<dyn Watch>, StoreError>> {
        Box::pin(self.subscribe(control_channel(owner), Listener::Control(sender)))
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let _: String = redis::cmd("PING")
                .query_async(&mut self.commands.clone())
                .await?;
            Ok(())
        })
    }
}
