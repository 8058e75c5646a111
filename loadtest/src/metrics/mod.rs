//! Measuring: `/proc` readers for the gateway's memory and CPU, limits and sysctl checks,
//! latency histograms, the gateway's own gauges, and the shared store's calls and memory.

pub mod gauges;
pub mod latency;
pub mod limits;
pub mod proc;
pub mod redis;
pub mod snapshot;
