//! The generated protobuf messages, server trait and client of package
//! `inference` (build.rs compiles proto/*.proto). Must not touch: anything
//! by hand; this file only includes the generated code.
#![allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]

tonic::include_proto!("inference");
