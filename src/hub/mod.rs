//! The generation hub: where tokens are kept and fanned out.
//!
//! - [`registry`]: id → generation, idempotency keys, one upstream task per generation,
//!   retention.
//! - [`generation`]: the token log, the subscriber set, fan-out with `try_send`.
//! - [`delta`]: one log entry (text, reasoning, refusal, a tool-call fragment) and its
//!   compact binary form.
//! - [`frame`]: SSE frames, encoded once per token and shared by every subscriber.
//! - [`subscription`]: a subscriber's read position: replay from the log, then live.
//! - [`queue`]: the bounded channel of one subscriber, which grows only as far as it lags.
//!
//! Nothing here knows about HTTP.

pub mod delta;
pub mod frame;
pub mod generation;
pub mod queue;
pub mod registry;
pub mod subscription;

pub use delta::Delta;
pub use generation::{
    Attach, Generation, LogLimits, Outbound, Outcome, Pushed, Resume, Snapshot, Status,
};
pub use registry::{Created, Hub, HubError, HubSettings};
pub use subscription::{Delivery, Subscription};
