//! The CPU backend (being written by the inference-core work).
