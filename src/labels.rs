//! The engine's fixed vocabularies: every value a metric label, an error's
//! `type` or a route table takes, each as an enum with one `as_str`.
//!
//! Owns: [`Route`] (the route templates, the HTTP layer registers its routes
//! from them and the metrics label requests with them), [`GrpcMethod`] (the
//! gRPC methods, by their paths), [`Endpoint`] (either: what a `route`
//! label says), [`FailureReason`]
//! (why a request got no model answer: the JSON error's `type` and the
//! failure metric's `reason`) and [`DropReason`] (why queued rows were not
//! computed) and [`ModelState`] (a model version's state in the repository
//! index), [`Scope`] (what an API key may do) and [`AuthFailure`] (why
//! the key check refused a request). `metrics.rs` builds its label vocabularies from the `ALL`
//! lists here, so a new variant appears everywhere at once. Must not touch:
//! anything that runs (this is a leaf module: it depends on nothing).

/// Defines a label enum: its variants, their text, and the `ALL` list.
macro_rules! label_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The label text.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

label_enum! {
    /// A route template: the path actix matches and the `route` label.
    /// `Other` is every request that matched no route.
    Route {
        Infer => "/infer",
        Healthz => "/healthz",
        Readyz => "/readyz",
        Metrics => "/metrics",
        V2Server => "/v2",
        V2Live => "/v2/health/live",
        V2Ready => "/v2/health/ready",
        V2Model => "/v2/models/{model}",
        V2ModelVersion => "/v2/models/{model}/versions/{version}",
        V2ModelReady => "/v2/models/{model}/ready",
        V2ModelVersionReady => "/v2/models/{model}/versions/{version}/ready",
        V2ModelConfig => "/v2/models/{model}/config",
        V2ModelVersionConfig => "/v2/models/{model}/versions/{version}/config",
        V2Infer => "/v2/models/{model}/infer",
        V2VersionInfer => "/v2/models/{model}/versions/{version}/infer",
        V2RepositoryIndex => "/v2/repository/index",
        V2RepositoryLoad => "/v2/repository/models/{model}/load",
        V2RepositoryUnload => "/v2/repository/models/{model}/unload",
        V2ModelStats => "/v2/models/{model}/stats",
        V2ModelVersionStats => "/v2/models/{model}/versions/{version}/stats",
        Other => "other",
    }
}

label_enum! {
    /// A gRPC method of `inference.GRPCInferenceService`, by its path (the
    /// `route` label of gRPC requests). `Other` is every path the service
    /// does not serve (answered UNIMPLEMENTED).
    GrpcMethod {
        ServerLive => "/inference.GRPCInferenceService/ServerLive",
        ServerReady => "/inference.GRPCInferenceService/ServerReady",
        ModelReady => "/inference.GRPCInferenceService/ModelReady",
        ServerMetadata => "/inference.GRPCInferenceService/ServerMetadata",
        ModelMetadata => "/inference.GRPCInferenceService/ModelMetadata",
        ModelConfig => "/inference.GRPCInferenceService/ModelConfig",
        ModelInfer => "/inference.GRPCInferenceService/ModelInfer",
        ModelStreamInfer => "/inference.GRPCInferenceService/ModelStreamInfer",
        ModelStatistics => "/inference.GRPCInferenceService/ModelStatistics",
        RepositoryIndex => "/inference.GRPCInferenceService/RepositoryIndex",
        RepositoryModelLoad => "/inference.GRPCInferenceService/RepositoryModelLoad",
        RepositoryModelUnload => "/inference.GRPCInferenceService/RepositoryModelUnload",
        Other => "grpc:other",
    }
}

impl GrpcMethod {
    /// The method whose path is `path`, or [`GrpcMethod::Other`].
    pub fn from_path(path: &str) -> GrpcMethod {
        GrpcMethod::ALL
            .iter()
            .copied()
            .find(|m| m.as_str() == path)
            .unwrap_or(GrpcMethod::Other)
    }
}

/// What a request came in on, whichever protocol: the `route` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Http(Route),
    Grpc(GrpcMethod),
}

impl Endpoint {
    /// The label text (an HTTP route template or a gRPC method path).
    pub const fn as_str(self) -> &'static str {
        match self {
            Endpoint::Http(r) => r.as_str(),
            Endpoint::Grpc(m) => m.as_str(),
        }
    }
}

impl From<Route> for Endpoint {
    fn from(r: Route) -> Endpoint {
        Endpoint::Http(r)
    }
}

impl From<GrpcMethod> for Endpoint {
    fn from(m: GrpcMethod) -> Endpoint {
        Endpoint::Grpc(m)
    }
}

impl Route {
    /// The route whose template is `pattern` (what actix reports as the
    /// matched pattern), or [`Route::Other`].
    pub fn from_template(pattern: &str) -> Route {
        Route::ALL
            .iter()
            .copied()
            .find(|r| r.as_str() == pattern)
            .unwrap_or(Route::Other)
    }
}

impl Route {
    /// An Open Inference Protocol route (Triton's status codes apply).
    pub fn is_v2(self) -> bool {
        self.as_str().starts_with("/v2")
    }

    /// The route a request path matches, as actix's router matches it (a
    /// `{name}` segment is one non-empty path segment), or [`Route::Other`].
    /// Used for the metric label, before or without routing.
    pub fn for_path(path: &str) -> Route {
        Route::ALL
            .iter()
            .copied()
            .find(|r| *r != Route::Other && template_matches(r.as_str(), path))
            .unwrap_or(Route::Other)
    }
}

fn template_matches(template: &str, path: &str) -> bool {
    let mut want = template.split('/');
    let mut got = path.split('/');
    loop {
        match (want.next(), got.next()) {
            (None, None) => return true,
            (Some(w), Some(g)) if w.starts_with('{') => {
                if g.is_empty() {
                    return false;
                }
            }
            (Some(w), Some(g)) if w == g => {}
            _ => return false,
        }
    }
}

label_enum! {
    /// Why a request got no model answer.
    FailureReason {
        Invalid => "invalid",
        TooLarge => "too_large",
        UnsupportedMediaType => "unsupported_media_type",
        /// The body did not arrive within `server.body_timeout_ms`.
        BodyTimeout => "body_timeout",
        Overloaded => "overloaded",
        Timeout => "timeout",
        /// The client went away before its answer.
        Cancelled => "cancelled",
        NotReady => "not_ready",
        NotFound => "not_found",
        MethodNotAllowed => "method_not_allowed",
        Internal => "internal",
        /// A web page's request, or a foreign `Host` on a loopback bind, or
        /// an API key without the route's scope (403).
        Forbidden => "forbidden",
        /// No API key, or one the server does not know (401).
        Unauthorized => "unauthorized",
    }
}

label_enum! {
    /// What an API key may do (`server.api_keys_file`); each route group
    /// needs one (health and readiness need none).
    Scope {
        /// The inference routes (`/infer`, v2 infer, gRPC ModelInfer and
        /// ModelStreamInfer).
        Infer => "infer",
        /// The repository routes (index, load, unload).
        Repository => "repository",
        /// Server and model metadata, config and statistics.
        Metadata => "metadata",
        /// `/metrics`.
        Metrics => "metrics",
    }
}

impl Scope {
    /// The scope named `text`, if any.
    pub fn parse(text: &str) -> Option<Scope> {
        Scope::ALL.iter().copied().find(|s| s.as_str() == text)
    }
}

label_enum! {
    /// Why a request was refused by the API-key check
    /// (`tokitai_auth_failures_total{reason}`).
    AuthFailure {
        /// No `Authorization` header (gRPC: `authorization` metadata).
        MissingKey => "missing_key",
        /// Not `Bearer <key>`.
        Malformed => "malformed",
        /// A key the keys file does not list.
        UnknownKey => "unknown_key",
        /// A known key without the scope the route needs (403).
        MissingScope => "missing_scope",
    }
}

label_enum! {
    /// A model version's state in the repository index (Triton's names).
    ModelState {
        /// Serving: new requests go to it.
        Ready => "READY",
        /// Being read, packed and warmed up (the previous version serves).
        Loading => "LOADING",
        /// Taken out of service, finishing the requests it accepted.
        Unloading => "UNLOADING",
        /// Not serving: its load failed (see the reason) or it was unloaded.
        Unavailable => "UNAVAILABLE",
    }
}

label_enum! {
    /// Why queued rows were dropped without being computed.
    DropReason {
        /// The request's deadline passed.
        Timeout => "timeout",
        /// The client went away.
        Cancelled => "cancelled",
        /// Another part of the same request failed, so it was already answered.
        Failed => "failed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_unique_and_templates_round_trip() {
        for all in [
            Route::ALL
                .iter()
                .map(|r| r.as_str())
                .chain(GrpcMethod::ALL.iter().map(|m| m.as_str()))
                .collect::<Vec<_>>(),
            FailureReason::ALL.iter().map(|r| r.as_str()).collect(),
            DropReason::ALL.iter().map(|r| r.as_str()).collect(),
            ModelState::ALL.iter().map(|r| r.as_str()).collect(),
        ] {
            let mut sorted = all.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), all.len(), "duplicate label in {all:?}");
        }
        for &route in Route::ALL {
            assert_eq!(Route::from_template(route.as_str()), route);
        }
        assert_eq!(Route::from_template("/../etc/passwd"), Route::Other);
        for &method in GrpcMethod::ALL {
            assert_eq!(GrpcMethod::from_path(method.as_str()), method);
            assert_eq!(Endpoint::from(method).as_str(), method.as_str());
        }
        assert_eq!(
            GrpcMethod::from_path("/inference.GRPCInferenceService/Trace"),
            GrpcMethod::Other
        );
    }
}
