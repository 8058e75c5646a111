//! The store on Redis (`--store-url redis://…`, `rediss://…` for TLS).
//!
//! Layout, per generation, every key sharing the hash tag `{gen_…}` (one cluster slot):
//! - `tf:{id}:m`, a hash: `owner`, `status`, `next` (the log's length), and at the end
//!   `token_count`, `finish_reason`, `usage`, `error_code`, `error_message`;
//! - `tf:{id}:s`, a Stream: the log, entry `i` at stream id `i-1`, its bytes in field `d`, so a
//!   read from index `i` is `XRANGE tf:{id}:s i-1 +`;
//! - `tf:{id}:l`, the owner's lease (its name, with a TTL);
//! - `tf:{id}:live`, the pub/sub channel of the live feed ([`super::wire`]).
//!
//! Every write by an owner is one Lua script (check the lease and the expected index, append,
//! renew the lease, publish), so the log and the live feed never disagree about order, and an
//! owner that lost its lease can never write again (fencing). Tokens ready together go in one
//! call. Idempotency keys are `tf:idem:{scope}:{key}` (`SET NX GET`), cancel requests go to
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
    AsyncCommands, Cmd, Pipeline, ProtocolVersion, PushInfo, PushKind, RedisFuture, RedisResult,
    Script, Value,
};
use tokio::sync::mpsc;

use super::{
    listeners::{self, Listener, Listeners, OnLast},
    wire, Claimed, End, IdempotencyClaim, Lifetimes, LiveSender, Meta, Store, StoreError, Watch,
    Written,
};

/// Appends entries at an expected index, if the caller holds (or may take) the lease.
/// KEYS: meta, stream, lease. ARGV: owner, first, lease ms, channel, live message, publish
/// command (`PUBLISH`, or `SPUBLISH` on a cluster), entries….
const APPEND: &str = r"
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing', 0} end
if status ~= 'running' then return {'fenced', 0} end
local holder = redis.call('GET', KEYS[3])
if holder and holder ~= ARGV[1] then return {'fenced', 0} end
local nxt = tonumber(redis.call('HGET', KEYS[1], 'next'))
local first = tonumber(ARGV[2])
if first ~= nxt then return {'expected', nxt} end
for i = 7, #ARGV do
  redis.call('XADD', KEYS[2], (first + i - 7) .. '-1', 'd', ARGV[i])
end
if first == 0 then
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'next', first + #ARGV - 6)
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[3])
redis.call(ARGV[6], ARGV[4], ARGV[5])
return {'ok', 0}
";

/// Renews the lease of a running generation. KEYS: meta, lease. ARGV: owner, lease ms.
const RENEW: &str = r"
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing', 0} end
if status ~= 'running' then return {'fenced', 0} end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then return {'fenced', 0} end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return {'ok', 0}
";

/// Ends a running generation: by its owner at the expected length, or (owner '') by anyone
/// once no lease is held. KEYS: meta, stream, lease. ARGV: owner, token_count, retention ms,
/// channel, live message, publish command, then field/value pairs of the end.
const FINISH: &str = r"
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing', 0} end
if status ~= 'running' then return {'fenced', 0} end
local holder = redis.call('GET', KEYS[3])
local nxt = tonumber(redis.call('HGET', KEYS[1], 'next'))
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
    renew: Script,
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
                renew: Script::new(RENEW),
                finish: Script::new(FINISH),
            },
        })
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
                .hset_multiple(
                    &meta,
                    &[("owner", owner), ("status", "running"), ("next", "0")],
                )
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
            let key = format!("tf:idem:{}:{}", claim.scope, claim.key);
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

    fn append<'a>(
        &'a self,
        id: &'a str,
        owner: &'a str,
        first: u64,
        entries: &'a [Bytes],
    ) -> BoxFuture<'a, Result<Written, StoreError>> {
        Box::pin(async move {
            let mut invocation = self.scripts.append.key(meta_key(id));
            invocation
                .key(stream_key(id))
                .key(lease_key(id))
                .arg(owner)
                .arg(first)
                .arg(millis(self.lifetimes.lease))
                .arg(live_channel(id))
                .arg(wire::entries(first, entries).as_ref())
                .arg(self.commands.publish_command());
            for entry in entries {
                invocation.arg(entry.as_ref());
            }
            written(invocation.invoke_async(&mut self.commands.clone()).await?)
        })
    }

    fn renew<'a>(
        &'a self,
        id: &'a str,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<Written, StoreError>> {
        Box::pin(async move {
            let reply = self
                .scripts
                .renew
                .key(meta_key(id))
                .key(lease_key(id))
                .arg(owner)
                .arg(millis(self.lifetimes.lease))
                .invoke_async(&mut self.commands.clone())
                .await?;
            written(reply)
        })
    }

    fn finish<'a>(
        &'a self,
        id: &'a str,
        owner: Option<&'a str>,
        end: &'a End,
    ) -> BoxFuture<'a, Result<Written, StoreError>> {
        Box::pin(async move {
            let mut invocation = self.scripts.finish.key(meta_key(id));
            invocation
                .key(stream_key(id))
                .key(lease_key(id))
                .arg(owner.unwrap_or(""))
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
            written(invocation.invoke_async(&mut self.commands.clone()).await?)
        })
    }

    fn meta<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Meta>, StoreError>> {
        Box::pin(async move {
            let (mut fields, lease_ttl): (HashMap<String, String>, i64) = redis::pipe()
                .hgetall(meta_key(id))
                .pttl(lease_key(id))
                .query_async(&mut self.commands.clone())
                .await?;
            let Some(status) = fields.remove("status") else {
                return Ok(None);
            };
            let number = |value: Option<String>| value.and_then(|v| v.parse::<u64>().ok());
            let next = number(fields.remove("next")).unwrap_or(0);
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
