//! Measuring: `/proc` readers for the gateway's memory and CPU, limits and sysctl checks, and
//! latency histograms.

pub mod latency;
pub mod limits;
pub mod proc;
pub mod snapshot;
