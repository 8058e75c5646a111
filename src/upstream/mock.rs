//! The embedded mock LLM (stub: to be written).
