//! What the shared store cost: `INFO commandstats` (calls per command) and `INFO memory`
//! (`used_memory`) read from Redis before and after a run, over a raw TCP connection speaking
//! just enough RESP for one command and its reply — no Redis client library for two reads.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const TIMEOUT: Duration = Duration::from_secs(5);

/// Commands whose calls per token are reported on their own; `eval` and `evalsha` together
/// are the owner's append script.
pub const REPORTED: [&str; 5] = ["evalsha", "eval", "xrange", "publish", "hgetall"];

/// Sends one command on a fresh connection and returns its simple-string, integer or bulk
/// reply as text.
pub async fn command(addr: SocketAddr, args: &[&str]) -> Result<String> {
    tokio::time::timeout(TIMEOUT, command_inner(addr, args))
        .await
        .with_context(|| format!("redis {args:?}: no answer within {TIMEOUT:?}"))?
}

async fn command_inner(addr: SocketAddr, args: &[&str]) -> Result<String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect to redis at {addr}"))?;
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    stream
        .write_all(request.as_bytes())
        .await
        .context("send redis command")?;
    let mut reader = BufReader::new(stream);
    let mut head = String::new();
    reader
        .read_line(&mut head)
        .await
        .context("read redis reply")?;
    let head = head.trim_end();
    let (kind, rest) = head.split_at(head.len().min(1));
    match kind {
        "+" | ":" => Ok(rest.to_string()),
        "$" => {
            let len: usize = rest
                .parse()
                .with_context(|| format!("bad bulk length {head:?}"))?;
            let mut body = vec![0u8; len + 2];
            reader
                .read_exact(&mut body)
                .await
                .context("read redis bulk reply")?;
            body.truncate(len);
            String::from_utf8(body).context("redis reply is not UTF-8")
        }
        _ => bail!("redis {args:?} answered {head:?}"),
    }
}

/// Entries of every generation's log (`tf:{id}:s`, one entry per token), counted by one
/// script. Read after the run's last `INFO`: the script and its calls would count otherwise.
/// `KEYS` walks the whole keyspace, which is fine for a load test's own Redis.
const COUNT_STORED: &str = "local n = 0 \
    for _, key in ipairs(redis.call('KEYS', 'tf:*:s')) do n = n + redis.call('XLEN', key) end \
    return n";

pub async fn stored_tokens(addr: SocketAddr) -> Result<u64> {
    command(addr, &["EVAL", COUNT_STORED, "0"])
        .await?
        .parse()
        .context("token count is not a number")
}

/// Generations by their owner's instance id and their status (`tf:{id}:m` fields `owner` and
/// `status`), as `owner:status=count` pairs joined by commas; one script, like the count above.
const COUNT_STATUSES: &str = "local counts = {} \
    for _, key in ipairs(redis.call('KEYS', 'tf:*:m')) do \
    local fields = redis.call('HMGET', key, 'owner', 'status') \
    local k = (fields[1] or '?') .. ':' .. (fields[2] or '?') \
    counts[k] = (counts[k] or 0) + 1 end \
    local out = {} for k, n in pairs(counts) do out[#out + 1] = k .. '=' .. n end \
    table.sort(out) return table.concat(out, ',')";

/// Generations counted by `owner:status` (e.g. `loadtest-0:interrupted`).
pub async fn generation_statuses(addr: SocketAddr) -> Result<BTreeMap<String, u64>> {
    let reply = command(addr, &["EVAL", COUNT_STATUSES, "0"]).await?;
    (reply.split(',').filter(|pair| !pair.is_empty()))
        .map(|pair| {
            let (key, count) = pair
                .rsplit_once('=')
                .with_context(|| format!("bad status count {pair:?}"))?;
            Ok((key.to_string(), count.parse().context("status count")?))
        })
        .collect()
}

/// Calls per command and memory in use at one moment.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RedisStats {
    pub calls: BTreeMap<String, u64>,
    pub used_memory: u64,
}

impl RedisStats {
    pub async fn read(addr: SocketAddr) -> Result<Self> {
        let commands = command(addr, &["INFO", "commandstats"]).await?;
        let memory = command(addr, &["INFO", "memory"]).await?;
        Self::parse(&commands, &memory)
    }

    /// `cmdstat_NAME:calls=N,usec=…` lines and the `used_memory:N` line.
    pub fn parse(commandstats: &str, memory: &str) -> Result<Self> {
        let calls = commandstats
            .lines()
            .filter_map(|line| {
                let (name, fields) = line.strip_prefix("cmdstat_")?.split_once(':')?;
                let calls = fields.split(',').find_map(|f| f.strip_prefix("calls="))?;
                Some((name.to_string(), calls.parse().ok()?))
            })
            .collect();
        let used_memory = memory
            .lines()
            .find_map(|line| line.strip_prefix("used_memory:"))
            .context("no used_memory in INFO memory")?
            .trim()
            .parse()
            .context("bad used_memory")?;
        Ok(Self { calls, used_memory })
    }
}

/// The store's work and memory over a run, against the tokens the owners appended.
#[derive(Debug, Clone, Serialize)]
pub struct StoreUse {
    /// Entries in the generations' logs at the end of streaming.
    pub tokens_stored: u64,
    /// Calls per command during the run; commands run inside scripts are counted too (Redis
    /// counts them), and our own `INFO` calls are left out.
    pub calls: BTreeMap<String, u64>,
    pub total_calls: u64,
    /// Calls per stored token of the `REPORTED` commands and of all of them.
    pub calls_per_token: BTreeMap<String, f64>,
    pub total_calls_per_token: Option<f64>,
    /// `used_memory` growth from before the generations were created to the end of streaming
    /// (before the retention expires anything).
    pub used_memory_delta_bytes: i64,
    pub memory_per_token_bytes: Option<f64>,
}

impl StoreUse {
    pub fn between(before: &RedisStats, after: &RedisStats, tokens_stored: u64) -> Self {
        let calls: BTreeMap<String, u64> = (after.calls.iter())
            .filter(|(name, _)| name.as_str() != "info")
            .map(|(name, &n)| {
                let was = before.calls.get(name).copied().unwrap_or(0);
                (name.clone(), n.saturating_sub(was))
            })
            .filter(|&(_, n)| n > 0)
            .collect();
        let total_calls = calls.values().sum();
        let per_token = |n: u64| (tokens_stored > 0).then(|| n as f64 / tokens_stored as f64);
        let used_memory_delta_bytes = after.used_memory as i64 - before.used_memory as i64;
        Self {
            tokens_stored,
            calls_per_token: REPORTED
                .iter()
                .filter_map(|&name| {
                    Some((
                        name.to_string(),
                        per_token(calls.get(name).copied().unwrap_or(0))?,
                    ))
                })
                .collect(),
            total_calls_per_token: per_token(total_calls),
            memory_per_token_bytes: per_token(1).map(|one| used_memory_delta_bytes as f64 * one),
            calls,
            total_calls,
            used_memory_delta_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commandstats_and_memory() {
        let commands = "# Commandstats\r\n\
            cmdstat_evalsha:calls=120,usec=900,usec_per_call=7.50,rejected_calls=0,failed_calls=0\r\n\
            cmdstat_info:calls=4,usec=80,usec_per_call=20.00,rejected_calls=0,failed_calls=0\r\n\
            cmdstat_xadd:calls=1000,usec=2000,usec_per_call=2.00,rejected_calls=0,failed_calls=0\r\n";
        let memory = "# Memory\r\nused_memory:1048576\r\nused_memory_human:1.00M\r\n";
        let stats = RedisStats::parse(commands, memory).unwrap();
        assert_eq!(stats.calls["evalsha"], 120);
        assert_eq!(stats.used_memory, 1 << 20);
        assert!(RedisStats::parse(commands, "# Memory\r\n").is_err());

        let before = RedisStats {
            calls: [("evalsha".to_string(), 20), ("info".to_string(), 2)].into(),
            used_memory: 1 << 20,
        };
        let used = StoreUse::between(&before, &stats, 1000);
        assert_eq!(used.calls.get("info"), None);
        assert_eq!((used.calls["evalsha"], used.total_calls), (100, 1100));
        assert_eq!(used.calls_per_token["evalsha"], 0.1);
        assert_eq!(used.calls_per_token["xrange"], 0.0);
        assert_eq!(used.total_calls_per_token, Some(1.1));
        assert_eq!(used.memory_per_token_bytes, Some(0.0));
        assert_eq!(
            StoreUse::between(&before, &stats, 0).total_calls_per_token,
            None
        );
    }

    #[tokio::test]
    async fn speaks_enough_resp_for_one_command() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            for reply in ["+PONG\r\n", "$5\r\nab\r\nc\r\n", "-ERR nope\r\n"] {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 256];
                let _ = socket.read(&mut buf).await.unwrap();
                socket.write_all(reply.as_bytes()).await.unwrap();
            }
        });
        assert_eq!(command(addr, &["PING"]).await.unwrap(), "PONG");
        assert_eq!(command(addr, &["INFO", "memory"]).await.unwrap(), "ab\r\nc");
        assert!(command(addr, &["NOPE"]).await.is_err());
        server.await.unwrap();
    }
}
