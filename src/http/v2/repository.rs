//! Triton's model repository extension over HTTP.
//!
//! Owns: `POST /v2/repository/index` (`{"ready": bool}` optional: only the
//! `READY` rows), `POST /v2/repository/models/{model}/load` and `.../unload`
//! (explicit control mode; an optional JSON body such as Triton clients send
//! is accepted and ignored). Each only parses and hands over to the engine;
//! status codes are `http/error.rs`'s (`V2Error::Repository`). Must not
//! touch: what loading does (the repository controller).

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;

use crate::engine::Engine;
use crate::error::RequestError;
use crate::http::HttpSettings;
use crate::http::error::V2Error;
use crate::http::extract::read_body;

/// Largest body these routes read (`{"ready": true}` is 15 bytes).
const MAX_CONTROL_BODY: usize = 64 * 1024;

#[derive(Deserialize)]
pub struct ModelName {
    model: String,
}

#[derive(Deserialize, Default)]
struct IndexRequest {
    #[serde(default)]
    ready: bool,
}

/// Reads the (optional) JSON body: an object, or nothing.
async fn read_control_body<T: for<'de> Deserialize<'de> + Default>(
    req: &HttpRequest,
    payload: web::Payload,
    settings: &HttpSettings,
) -> Result<T, V2Error> {
    let body = read_body(req, payload, MAX_CONTROL_BODY, settings.body_timeout).await?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&body).map_err(|e| {
        V2Error::from(RequestError::Protocol(format!(
            "failed to parse the request JSON: {}",
            crate::input::clip(&e.to_string())
        )))
    })
}

/// `POST /v2/repository/index`
pub async fn index(
    req: HttpRequest,
    payload: web::Payload,
    engine: web::Data<Engine>,
    settings: web::Data<HttpSettings>,
) -> Result<HttpResponse, V2Error> {
    let request: IndexRequest = read_control_body(&req, payload, &settings).await?;
    Ok(HttpResponse::Ok().json(engine.repository_index(request.ready)))
}

/// Any JSON object: Triton's clients may send `{"parameters": {...}}`.
#[derive(Deserialize, Default)]
struct ControlRequest {
    #[serde(default, rename = "parameters")]
    _parameters: Option<serde_json::Map<String, serde_json::Value>>,
}

/// `POST /v2/repository/models/{model}/load`: 200 once the model's
/// highest version serves (or its files are unchanged).
pub async fn load(
    req: HttpRequest,
    payload: web::Payload,
    engine: web::Data<Engine>,
    settings: web::Data<HttpSettings>,
    path: web::Path<ModelName>,
) -> Result<HttpResponse, V2Error> {
    let _: ControlRequest = read_control_body(&req, payload, &settings).await?;
    engine.load_model(&path.model).await?;
    Ok(HttpResponse::Ok().finish())
}

/// `POST /v2/repository/models/{model}/unload`: 200 once the requests the
/// model had accepted are answered; new ones get 503 from the moment it is
/// called.
pub async fn unload(
    req: HttpRequest,
    payload: web::Payload,
    engine: web::Data<Engine>,
    settings: web::Data<HttpSettings>,
    path: web::Path<ModelName>,
) -> Result<HttpResponse, V2Error> {
    let _: ControlRequest = read_control_body(&req, payload, &settings).await?;
    engine.unload_model(&path.model).await?;
    Ok(HttpResponse::Ok().finish())
}
