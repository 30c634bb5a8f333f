//! API keys (`server.api_keys_file`, issue 23) on gRPC, against the real
//! server: with a tonic client and `authorization` metadata, every RPC asks
//! for its scope (ServerLive, ServerReady and ModelReady for none: probes),
//! no or an unknown key gets UNAUTHENTICATED, a key without the scope
//! PERMISSION_DENIED, a stream is checked when it opens, and the refusals
//! are counted by reason and code; with Triton's own clients
//! (tests/triton/auth_check.py), the key sent through their `headers=`
//! arguments on HTTP and gRPC.
//!
//! Owns: nothing but tests. Must not touch: the engine's code.

use tokitai_serve::grpc::pb;
use tokitai_serve::labels::GrpcMethod;
use tonic::Code;

use crate::common::grpc::{GrpcClient, INFER, MODEL, client, rows_request, runtime};
use crate::common::{Metrics, TestServer, assert_pass, base_config, metrics_at, nano_dims, run_python};

const INFER_KEY: &str = "infer-key-0123456789abcdef";
const REPOSITORY_KEY: &str = "repository-key-0123456789abcdef";
const METADATA_KEY: &str = "metadata-key-0123456789abcdef";
const UNKNOWN_KEY: &str = "unknown-key-0123456789abcdef";
/// infer and metadata, for Triton's clients (which read metadata first).
const CLIENT_KEY: &str = "client-key-0123456789abcdef";

/// Each scope's key.
const SCOPE_KEYS: [(&str, &str); 3] = [
    ("infer", INFER_KEY),
    ("repository", REPOSITORY_KEY),
    ("metadata", METADATA_KEY),
];

/// A server with the keys above; `/metrics` open (`metrics_scope = none`).
fn keyed_server() -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api-keys");
    let mut text: String = SCOPE_KEYS.iter().map(|(s, k)| format!("{k} {s}\n")).collect();
    text.push_str(&format!("{CLIENT_KEY} infer,metadata\n"));
    std::fs::write(&path, text).unwrap();
    let mut config = base_config();
    config.server.api_keys_file = Some(path);
    config.server.metrics_scope = tokitai_serve::config::ScopeSetting::None;
    (TestServer::start(config), dir)
}

/// `message` with `authorization: Bearer {key}` metadata, if a key.
fn request<T>(message: T, key: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    if let Some(key) = key {
        let value = format!("Bearer {key}").parse().expect("an ASCII metadata value");
        r.metadata_mut().insert("authorization", value);
    }
    r
}

/// The scope each RPC needs (`None`: open).
fn needs(method: GrpcMethod) -> Option<&'static str> {
    match method {
        GrpcMethod::ServerLive | GrpcMethod::ServerReady | GrpcMethod::ModelReady | GrpcMethod::Other => None,
        GrpcMethod::ModelInfer | GrpcMethod::ModelStreamInfer => Some("infer"),
        GrpcMethod::RepositoryIndex | GrpcMethod::RepositoryModelLoad | GrpcMethod::RepositoryModelUnload => {
            Some("repository")
        }
        _ => Some("metadata"),
    }
}

/// Calls `method` with `key`: the status code (a stream: of its opening,
/// then of its one answer).
async fn call(c: &mut GrpcClient, method: GrpcMethod, key: Option<&str>) -> Code {
    let name = || MODEL.to_string();
    // A model that does not exist: an allowed load or unload changes nothing.
    let nosuch = || "nosuch".to_string();
    let result = match method {
        GrpcMethod::ServerLive => c.server_live(request(pb::ServerLiveRequest {}, key)).await.map(drop),
        GrpcMethod::ServerReady => c.server_ready(request(pb::ServerReadyRequest {}, key)).await.map(drop),
        GrpcMethod::ModelReady => {
            let m = pb::ModelReadyRequest {
                name: name(),
                ..Default::default()
            };
            c.model_ready(request(m, key)).await.map(drop)
        }
        GrpcMethod::ServerMetadata => c
            .server_metadata(request(pb::ServerMetadataRequest {}, key))
            .await
            .map(drop),
        GrpcMethod::ModelMetadata => {
            let m = pb::ModelMetadataRequest {
                name: name(),
                ..Default::default()
            };
            c.model_metadata(request(m, key)).await.map(drop)
        }
        GrpcMethod::ModelConfig => {
            let m = pb::ModelConfigRequest {
                name: name(),
                ..Default::default()
            };
            c.model_config(request(m, key)).await.map(drop)
        }
        GrpcMethod::ModelStatistics => {
            let m = pb::ModelStatisticsRequest::default();
            c.model_statistics(request(m, key)).await.map(drop)
        }
        GrpcMethod::ModelInfer => c.model_infer(request(rows_request(1), key)).await.map(drop),
        GrpcMethod::ModelStreamInfer => stream_once(c, key).await,
        GrpcMethod::RepositoryIndex => {
            let m = pb::RepositoryIndexRequest::default();
            c.repository_index(request(m, key)).await.map(drop)
        }
        GrpcMethod::RepositoryModelLoad => {
            let m = pb::RepositoryModelLoadRequest {
                model_name: nosuch(),
                ..Default::default()
            };
            c.repository_model_load(request(m, key)).await.map(drop)
        }
        GrpcMethod::RepositoryModelUnload => {
            let m = pb::RepositoryModelUnloadRequest {
                model_name: nosuch(),
                ..Default::default()
            };
            c.repository_model_unload(request(m, key)).await.map(drop)
        }
        GrpcMethod::Other => unreachable!("not an RPC"),
    };
    match result {
        Ok(()) => Code::Ok,
        Err(status) => status.code(),
    }
}

/// A stream with one request: refused when it opens, or its one answer.
async fn stream_once(c: &mut GrpcClient, key: Option<&str>) -> Result<(), tonic::Status> {
    let requests = futures_util::stream::iter([rows_request(1)]);
    let mut answers = c.model_stream_infer(request(requests, key)).await?.into_inner();
    let answer = answers.message().await?.expect("one answer on the stream");
    assert!(answer.error_message.is_empty(), "{}", answer.error_message);
    Ok(())
}

/// Asserts one call of `method` per kind of key and returns how many were refused (no / unknown key, missing scope).
async fn assert_method(c: &mut GrpcClient, method: GrpcMethod) -> (usize, usize) {
    let what = method.as_str();
    let Some(scope) = needs(method) else {
        assert_eq!(call(c, method, None).await, Code::Ok, "{what} is open");
        return (0, 0);
    };
    assert_eq!(call(c, method, None).await, Code::Unauthenticated, "{what}, no key");
    assert_eq!(
        call(c, method, Some(UNKNOWN_KEY)).await,
        Code::Unauthenticated,
        "{what}, unknown key"
    );
    let mut denied = 0;
    for (key_scope, key) in SCOPE_KEYS {
        let code = call(c, method, Some(key)).await;
        if key_scope == scope {
            assert!(
                !matches!(code, Code::Unauthenticated | Code::PermissionDenied),
                "{what} with its key: {code:?}"
            );
            if scope != "repository" {
                assert_eq!(code, Code::Ok, "{what} with its key");
            }
        } else {
            assert_eq!(code, Code::PermissionDenied, "{what} with the {key_scope} key");
            denied += 1;
        }
    }
    (2, denied)
}

#[test]
fn every_rpc_asks_for_its_scope_and_the_probes_stay_open() {
    let (server, _dir) = keyed_server();
    let rt = runtime();
    let (unauthenticated, denied) = rt.block_on(async {
        let mut c = client(server.grpc_addr()).await;
        let mut totals = (0, 0);
        for &method in GrpcMethod::ALL.iter().filter(|m| **m != GrpcMethod::Other) {
            let (u, d) = assert_method(&mut c, method).await;
            totals = (totals.0 + u, totals.1 + d);
        }
        // A malformed credential (not `Bearer <key>`).
        let mut r = request(rows_request(1), None);
        r.metadata_mut()
            .insert("authorization", "Basic aW5mZXI=".parse().unwrap());
        assert_eq!(c.model_infer(r).await.unwrap_err().code(), Code::Unauthenticated);
        totals
    });
    let m: Metrics = metrics_at(&server.url("/metrics"));
    let auth = |reason: &str| m.sum("tokitai_auth_failures_total", &[("reason", reason)]) as usize;
    assert_eq!(auth("missing_key"), unauthenticated / 2);
    assert_eq!(auth("unknown_key"), unauthenticated / 2);
    assert_eq!(auth("malformed"), 1);
    assert_eq!(auth("missing_scope"), denied);
    let infer = GrpcMethod::ModelInfer.as_str();
    let code = |code: &str| m.sum("tokitai_grpc_requests_total", &[("route", infer), ("code", code)]);
    assert_eq!(code("UNAUTHENTICATED"), 3.0, "no key, unknown key, malformed");
    assert_eq!(code("PERMISSION_DENIED"), 2.0);
    let failures = |reason: &str| {
        m.sum(
            "tokitai_request_failures_total",
            &[("route", infer), ("reason", reason)],
        )
    };
    assert_eq!((failures("unauthorized"), failures("forbidden")), (3.0, 2.0));
    server.shutdown();
}

#[test]
fn tritonclients_send_the_key_through_their_header_arguments() {
    let (server, _dir) = keyed_server();
    let out = run_python(
        "auth_check.py",
        &[
            &server.addr().to_string(),
            &server.grpc_addr().to_string(),
            MODEL,
            &nano_dims().input.to_string(),
            CLIENT_KEY,
            REPOSITORY_KEY,
        ],
    );
    assert_pass("auth_check.py", &out);
    server.shutdown();
}

#[test]
fn a_call_without_a_key_is_refused_before_its_message_arrives() {
    let (server, _dir) = keyed_server();
    let addr = server.grpc_addr();
    runtime().block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (h2, connection) = h2::client::handshake(tcp).await.expect("HTTP/2 handshake");
        tokio::spawn(connection);
        let mut h2 = h2.ready().await.unwrap();
        let head = http::Request::post(format!("http://{addr}{INFER}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        // The head alone: the message never comes (the stream stays open).
        let (response, _message) = h2.send_request(head, false).unwrap();
        let limit = std::time::Duration::from_secs(10);
        let response = tokio::time::timeout(limit, response).await;
        let response = response.expect("answered on the head alone").expect("an answer");
        assert_eq!(response.headers()["grpc-status"], "16", "UNAUTHENTICATED");
    });
    server.shutdown();
}
