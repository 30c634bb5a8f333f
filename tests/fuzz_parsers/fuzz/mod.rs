//! Helpers for `tests/fuzz_parsers/main.rs`: JSON trees the fuzzer writes
//! ([`json::Node`]) and reads back ([`json::J`]), the mutations it applies
//! to them ([`mutate`]), and the independent reference parsers the engine's
//! two request parsers are checked against ([`reference`]).

pub mod json;
pub mod mutate;
pub mod reference;
