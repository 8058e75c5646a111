//! Measuring: `/proc` readers for the gateway's memory and CPU, limits and sysctl checks,
//! latency histograms, and the gateway's own gauges.

pub mod gauges;
pub mod latency;
pub mod limits;
pub mod proc;
pub mod snapshot;
