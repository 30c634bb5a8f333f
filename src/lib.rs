//! tokitai-serve: an actor-based concurrent serving engine for the
//! tokitai-operator Mixture-of-Experts quality-decision models.
//!
//! (The request-path layout is filled in as the serving layer lands.)

pub mod backend;
pub mod model;
