//! SSE parsing of the provider stream (stub).
