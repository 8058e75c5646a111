//! The load-generating side: a hand-rolled SSE subscriber (raw `TcpStream`, HTTP/1.1 GET,
//! chunked decoding, SSE parsing) that costs a few kilobytes per connection, and its counters.

pub mod chunked;
pub mod connect;
pub mod direct;
pub mod http;
pub mod link;
pub mod payload;
pub mod sse;
pub mod stats;
pub mod subscriber;
