//! The generation hub: where tokens are kept and fanned out.
//!
//! - [`registry`]: id → generation, idempotency keys, one upstream task per generation,
//!   retention.
//! - [`generation`]: the token log, the subscriber set, fan-out with `try_send`.
//! - `log`: the log's storage: every entry's frame, back to back in shared chunks.
//! - [`delta`]: one log entry (text, reasoning, refusal, a tool-call fragment) and its
//!   compact binary form.
//! - [`frame`]: SSE frames, encoded once per token and shared by every subscriber.
//! - [`subscription`]: a subscriber's read position: replay from the log, then live.
//! - [`queue`]: the bounded channel of one subscriber, which grows only as far as it lags.
//! - `writer` and `replica`: with a shared store, the owner's copy of a generation to the store,
//!   and another instance's copy of it from the store.
//!
//! Nothing here knows about HTTP.

pub mod delta;
pub mod frame;
pub mod generation;
#[cfg(test)]
mod lag_tests;
mod log;
pub mod queue;
pub mod registry;
mod replica;
#[cfg(test)]
mod shared_tests;
pub mod subscription;
mod writer;

pub use delta::Delta;
pub use generation::{
    Attach, Generation, LogLimits, Outbound, Outcome, Pushed, Resume, Snapshot, Status,
};
pub use registry::{Created, Hub, HubError, HubSettings, IdempotencyKey, Shared};
pub use subscription::{Delivery, Subscription};
