//! `tokenfan-loadtest floor`: what the kernel alone charges for a fan-out on this machine.
//!
//! One thread sends a token-sized frame to each of N loopback TCP sockets, `--rate` rounds a
//! second, with plain blocking `send(2)` calls and nothing else: no runtime, no channels, no
//! HTTP. Another thread reads every socket, like the load client does. The sender's own CPU
//! clock, divided by the sends, is the floor that any server writing each subscriber's socket
//! once per event pays here — including, on loopback, the receiving side's TCP processing,
//! which the kernel runs in the sender's context. The time one round takes is the floor of
//! the last subscriber's delivery latency at that N. With `--threads T` the sockets are split
//! into T shares, each sent by its own thread in the same rounds: the floor spread over the
//! cores, as a multi-threaded server would spread its subscribers; a round then lasts as long
//! as its slowest thread's share, and the CPU is the sending threads' sum.
//!
//! With `--relay` it measures the floor of `chat` instead: each token is written to an
//! "upstream" socket, read by a relay and written to its "subscriber" socket. The relay is one
//! thread running a tokio runtime with one task per pair that only reads and writes (no HTTP, no
//! SSE, no JSON, no log). Its CPU per token is what reading a token from a provider and writing
//! it to one subscriber costs here, in the same process accounting as the gateway's (on
//! loopback, the relay also pays the ACKs its reads send and the subscriber's receive path).
//! With `--relay-workers W` the relay runs on a multi-threaded runtime of W workers instead, as
//! the gateway does, and its CPU is the workers' sum.

use std::{
    io::Write,
    net::{TcpListener, TcpStream},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::metrics::{limits, proc};

#[derive(Debug, clap::Args)]
pub struct FloorArgs {
    /// Sockets to send to. Both ends live in this process, so each costs two descriptors.
    #[arg(short = 'n', long, default_value_t = 9_000)]
    pub connections: usize,
    /// Rounds a second (the broadcast preset's token rate).
    #[arg(long, default_value_t = 20)]
    pub rate: u32,
    /// How long to send.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Bytes per send: a mock token frame with its id and `data:` line is about 60.
    #[arg(long, default_value_t = 60)]
    pub frame_bytes: usize,
    /// Sending threads, each with an equal share of the sockets (the reader is one more).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub threads: u32,
    /// Relay each token from an upstream socket to a subscriber socket instead (the floor of
    /// `chat`); the sends of a round are spread over the round, as generations' tokens are.
    #[arg(long)]
    pub relay: bool,
    /// With `--relay`: run the relay on a multi-threaded tokio runtime of this many workers
    /// (the gateway's default is one per core) instead of one thread; its CPU is then its
    /// workers' sum.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub relay_workers: Option<u32>,
}

pub fn main(args: &FloorArgs) -> Result<()> {
    if args.relay {
        return relay(args);
    }
    ensure_open_files(2 * args.connections)?;
    let (senders, receivers) = connect_pairs(args.connections)?;
    let reader = thread::spawn(move || pump(receivers, Vec::new()).map(|(_, read)| read));

    let frame = vec![b'x'; args.frame_bytes];
    let rounds = u64::from(args.rate) * args.seconds;
    let period = Duration::from_secs(1) / args.rate;
    let share = args.connections.div_ceil(args.threads as usize);
    let started = Instant::now();
    let sent = thread::scope(|scope| {
        let threads: Vec<_> = senders
            .chunks(share)
            .map(|sockets| {
                let frame = &frame;
                scope.spawn(move || send_rounds(sockets, frame, rounds, period, started))
            })
            .collect();
        threads
            .into_iter()
            .map(|sender| {
                sender
                    .join()
                    .map_err(|_| anyhow::anyhow!("a sender panicked"))?
            })
            .collect::<Result<Vec<_>>>()
    })?;
    drop(senders);
    let cpu: f64 = sent.iter().map(|(cpu, _)| cpu).sum();
    // A round takes as long as its slowest share. Not the earliest start to the latest end:
    // on a saturated machine one sender falls behind the schedule, and its lateness would add
    // up round after round into every span.
    let mut round_times: Vec<Duration> = (0..rounds as usize)
        .map(|round| {
            sent.iter()
                .map(|(_, spans)| spans[round].1 - spans[round].0)
                .max()
                .unwrap_or_default()
        })
        .collect();
    let received = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;

    let sends = rounds * args.connections as u64;
    let expected = sends * args.frame_bytes as u64;
    if received != expected {
        bail!("the reader got {received} bytes, {expected} were sent");
    }
    round_times.sort();
    let at = |q: f64| round_times[((round_times.len() - 1) as f64 * q) as usize];
    println!(
        "floor: {} sockets, {rounds} rounds of one {}-byte send each ({} sends), {} sending \
         thread(s)\n\
         sender CPU: {cpu:.2} s = {:.2} µs per send\n\
         one round (all sockets once): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        args.connections,
        args.frame_bytes,
        sends,
        sent.len(),
        cpu * 1e6 / sends as f64,
        at(0.5).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        at(1.0).as_secs_f64() * 1e3,
    );
    Ok(())
}

/// Sends `frame` once to each of `sockets` per round, rounds `period` apart from `started`.
/// Returns this thread's CPU seconds and when each round began and ended.
fn send_rounds(
    sockets: &[TcpStream],
    frame: &[u8],
    rounds: u64,
    period: Duration,
    started: Instant,
) -> Result<(f64, Vec<(Instant, Instant)>)> {
    let mut spans = Vec::with_capacity(rounds as usize);
    let cpu_before = proc::read_thread_cpu_seconds()?;
    for round in 0..rounds {
        let due = started + period * u32::try_from(round).unwrap_or(u32::MAX);
        thread::sleep(due.saturating_duration_since(Instant::now()));
        let begun = Instant::now();
        for mut socket in sockets {
            socket.write_all(frame).context("send")?;
        }
        spans.push((begun, Instant::now()));
    }
    Ok((proc::read_thread_cpu_seconds()? - cpu_before, spans))
}

/// Groups a round's sends are split into, one after another across the round.
const RELAY_GROUPS: usize = 50;

fn relay(args: &FloorArgs) -> Result<()> {
    let floor = relay_floor(args)?;
    println!(
        "relay floor: {} pairs, {} rounds of one {}-byte token each ({} tokens, \
         {} a second)\nrelay CPU ({}: a tokio task per pair reading upstream and \
         writing its subscriber): {:.2} s = {:.2} µs per token",
        floor.pairs,
        floor.rounds,
        args.frame_bytes,
        floor.tokens,
        u64::from(args.rate) * floor.pairs as u64,
        match args.relay_workers {
            None => "one thread".to_string(),
            Some(workers) => format!("a runtime of {workers} workers"),
        },
        floor.cpu_s,
        floor.us_per_token,
    );
    Ok(())
}

/// What one relay-floor run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RelayFloor {
    pub pairs: usize,
    pub rounds: u64,
    pub tokens: u64,
    /// The relay's CPU over the run: its thread's, or its workers' sum.
    pub cpu_s: f64,
    pub us_per_token: f64,
}

/// Runs the relay floor of `args` (`--relay`) and checks every byte arrived.
pub fn relay_floor(args: &FloorArgs) -> Result<RelayFloor> {
    ensure_open_files(4 * args.connections)?;
    let (sources, relay_in) = connect_pairs(args.connections)?;
    let (relay_out, subscribers) = connect_pairs(args.connections)?;
    let reader = thread::spawn(move || pump(subscribers, Vec::new()).map(|(_, read)| read));
    let workers = args.relay_workers;
    let relay = thread::spawn(move || match workers {
        None => pump(relay_in, relay_out),
        Some(workers) => pump_on_workers(relay_in, relay_out, workers),
    });

    let frame = vec![b'x'; args.frame_bytes];
    let rounds = u64::from(args.rate) * args.seconds;
    let group_period = Duration::from_secs(1) / args.rate / RELAY_GROUPS as u32;
    let group_size = args.connections.div_ceil(RELAY_GROUPS);
    let started = Instant::now();
    let mut step = 0u32;
    for _ in 0..rounds {
        for group in sources.chunks(group_size) {
            let due = started + group_period * step;
            step += 1;
            thread::sleep(due.saturating_duration_since(Instant::now()));
            for mut socket in group {
                socket.write_all(&frame).context("send")?;
            }
        }
    }
    drop(sources);
    let (cpu, relayed) = relay
        .join()
        .map_err(|_| anyhow::anyhow!("relay panicked"))??;
    let received = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;

    let tokens = rounds * args.connections as u64;
    let expected = tokens * args.frame_bytes as u64;
    if relayed != expected || received != expected {
        bail!("relayed {relayed} and received {received} bytes, {expected} were sent");
    }
    Ok(RelayFloor {
        pairs: args.connections,
        rounds,
        tokens,
        cpu_s: cpu,
        us_per_token: cpu * 1e6 / tokens as f64,
    })
}

/// `n` connected loopback pairs: (the accepted ends we send on, the connecting ends we read).
fn connect_pairs(n: usize) -> Result<(Vec<TcpStream>, Vec<TcpStream>)> {
    let listener = TcpListener::bind("127.0.0.1:0").context("listen")?;
    let addr = listener.local_addr()?;
    let mut senders = Vec::with_capacity(n);
    let mut receivers = Vec::with_capacity(n);
    for _ in 0..n {
        receivers.push(TcpStream::connect(addr).context("connect")?);
        let (accepted, _) = listener.accept().context("accept")?;
        // As the gateway does: small frames go out at once.
        accepted.set_nodelay(true)?;
        senders.push(accepted);
    }
    Ok((senders, receivers))
}

/// Raises the open-files limit and checks that `descriptors` (plus a reserve) fit under it.
fn ensure_open_files(descriptors: usize) -> Result<()> {
    let (soft, _hard) = limits::raise_nofile()?;
    let needed = descriptors as u64 + 64;
    if soft < needed {
        bail!("this run needs {needed} open files; the limit is {soft}");
    }
    Ok(())
}

/// Reads every socket of `inputs` to its end on this thread, one tokio task each, writing what
/// it reads to the socket of `outputs` at the same position, if there is one. Returns this
/// thread's CPU seconds over the run and the bytes read.
fn pump(inputs: Vec<TcpStream>, outputs: Vec<TcpStream>) -> Result<(f64, u64)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let cpu_before = proc::read_thread_cpu_seconds()?;
    let read = runtime.block_on(relay_tasks(inputs, outputs))?;
    Ok((proc::read_thread_cpu_seconds()? - cpu_before, read))
}

/// [`pump`] on a multi-threaded runtime of `workers`: the CPU is what its worker threads used
/// in their lives (each adds its own when it stops), the caller's thread only waits.
fn pump_on_workers(
    inputs: Vec<TcpStream>,
    outputs: Vec<TcpStream>,
    workers: u32,
) -> Result<(f64, u64)> {
    let micros = Arc::new(AtomicU64::new(0));
    let counted = micros.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers as usize)
        .enable_io()
        .on_thread_stop(move || {
            if let Ok(cpu) = proc::read_thread_cpu_seconds() {
                counted.fetch_add((cpu * 1e6) as u64, Ordering::Relaxed);
            }
        })
        .build()?;
    let read = runtime.block_on(relay_tasks(inputs, outputs))?;
    drop(runtime);
    Ok((micros.load(Ordering::Relaxed) as f64 / 1e6, read))
}

/// One task per input socket, reading it to its end and writing what it reads to the output
/// at the same position, if there is one; the bytes read, all together.
async fn relay_tasks(inputs: Vec<TcpStream>, outputs: Vec<TcpStream>) -> Result<u64> {
    let mut outputs = outputs.into_iter();
    let mut tasks = tokio::task::JoinSet::new();
    for input in inputs {
        let mut input = tokio_stream(input)?;
        let mut output = outputs.next().map(tokio_stream).transpose()?;
        tasks.spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut buf = [0; 4096];
            let mut total = 0u64;
            loop {
                let read = input.read(&mut buf).await?;
                if read == 0 {
                    return Ok::<_, std::io::Error>(total);
                }
                total += read as u64;
                if let Some(output) = &mut output {
                    output.write_all(&buf[..read]).await?;
                }
            }
        });
    }
    let mut total = 0;
    while let Some(read) = tasks.join_next().await {
        total += read??;
    }
    Ok(total)
}

fn tokio_stream(socket: TcpStream) -> std::io::Result<tokio::net::TcpStream> {
    socket.set_nonblocking(true)?;
    tokio::net::TcpStream::from_std(socket)
}
