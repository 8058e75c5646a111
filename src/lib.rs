//! tokenfan: a gateway that streams LLM tokens to many clients over Server-Sent Events.

pub mod config;
pub mod upstream;
