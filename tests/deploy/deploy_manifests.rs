//! deploy/ checked without a cluster: every overlay renders with `kubectl
//! kustomize`; every core object validates with `kubernetes-validate
//! --strict` (oldest and newest Kubernetes the manifests claim), the KEDA and
//! Prometheus-operator objects with their published schemas, the KServe
//! objects for the fields KServe requires; the Dockerfile passes hadolint
//! and builds with CI's command; and every flag, setting, port and path a
//! manifest names is one the engine has: container arguments go through the
//! engine's own command-line parser and configuration loader, probe and
//! scrape paths are asked of a real server. The `service` overlay reads its
//! API keys from a Secret it does not render, and its probes and Prometheus
//! get through without a key (asked of a real server with those settings).
//!
//! Needs the tools `deploy/check/install.sh` installs (`.ci/run` calls it) and
//! `kubectl` on PATH. Without them these tests fail, never skip.
//!
//! Owns: nothing but tests. Must not touch: the engine's behaviour.

use std::collections::BTreeSet;
use std::process::Command;

use crate::common::deploy::{self, OVERLAYS, container, object, rendered, repo_root, yaml_file};
use crate::common::{TestServer, agent, base_config, finish, get};
use clap::Parser;
use serde_json::{Value, json};
use tokitai_serve::cli::Cli;
use tokitai_serve::config::Config;
use tokitai_serve::labels::{Route, Scope};

/// The Kubernetes versions the manifests are validated against: 1.30 is the
/// first with the preStop `sleep` action on by default, 1.37 the newest schema.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];

/// Kinds with a schema in kubernetes-validate (the core API).
const CORE_KINDS: [&str; 6] = [
    "ConfigMap",
    "Deployment",
    "HorizontalPodAutoscaler",
    "PersistentVolumeClaim",
    "PodDisruptionBudget",
    "Service",
];
/// Kinds validated with the published CRD models (deploy/check/validate_crds.mjs).
const CRD_KINDS: [&str; 3] = ["PodMonitor", "ScaledObject", "ServiceMonitor"];
/// Kinds checked for KServe's required fields.
const KSERVE_KINDS: [&str; 2] = ["InferenceService", "ServingRuntime"];

// ---- validators ------------------------------------------------------------

/// kubernetes-validate --strict on `objects` for every version; Err with its output.
fn kubernetes_validate(objects: &[Value]) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("objects.yaml");
    // JSON is YAML: one document per object.
    let text: String = objects.iter().map(|o| format!("---\n{o}\n")).collect();
    std::fs::write(&path, text).unwrap();
    let tool = deploy::deploy_venv().join("bin/kubernetes-validate");
    for version in KUBERNETES_VERSIONS {
        let (ok, out, err) = deploy::run(Command::new(&tool).args(["--strict", "-k", version]).arg(&path), b"");
        let all = format!("{out}{err}");
        // A kind without a schema is only a warning to the tool: not here.
        if !ok || all.contains("Couldn't find schema") || all.contains("FAIL") {
            return Err(format!("kubernetes {version}:\n{all}"));
        }
    }
    Ok(())
}

/// The published KEDA / Prometheus-operator models on `objects`; Err with the output.
fn validate_crds(objects: &[Value]) -> Result<String, String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("objects.json");
    std::fs::write(&path, Value::Array(objects.to_vec()).to_string()).unwrap();
    let script = std::fs::read_to_string(repo_root().join("deploy/check/validate_crds.mjs")).unwrap();
    let (ok, out, err) = deploy::run(
        Command::new("node")
            .args(["--input-type=module", "-e", &script])
            .env("TOKITAI_CRD_OBJECTS", &path)
            .current_dir(deploy::deploy_npm()),
        b"",
    );
    if ok { Ok(out) } else { Err(format!("{out}{err}")) }
}

/// A pod around `containers`, so the core schema checks a container list
/// embedded in another kind.
fn pod_of(containers: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "embedded"},
           "spec": {"containers": containers}})
}

fn kind_of(o: &Value) -> &str {
    o["kind"].as_str().unwrap_or("?")
}

// ---- tests: rendering and schemas ------------------------------------------

#[test]
fn every_overlay_renders_and_every_object_validates() {
    let expected: [(&str, &[&str]); 5] = [
        (
            "service",
            &[
                "ConfigMap",
                "Deployment",
                "HorizontalPodAutoscaler",
                "PersistentVolumeClaim",
                "PodDisruptionBudget",
                "Service",
            ],
        ),
        (
            "service-keda",
            &[
                "ConfigMap",
                "Deployment",
                "PersistentVolumeClaim",
                "PodDisruptionBudget",
                "ScaledObject",
                "Service",
            ],
        ),
        ("sidecar", &["ConfigMap", "Deployment", "PersistentVolumeClaim"]),
        ("kserve", &["InferenceService", "ServingRuntime"]),
        ("monitoring", &["PodMonitor", "ServiceMonitor"]),
    ];
    for (overlay, kinds) in expected {
        let docs = rendered(overlay);
        let found: BTreeSet<&str> = docs.iter().map(kind_of).collect();
        assert_eq!(found, kinds.iter().copied().collect(), "kinds rendered by {overlay}");
        let core: Vec<Value> = docs
            .iter()
            .filter(|o| CORE_KINDS.contains(&kind_of(o)))
            .cloned()
            .collect();
        let crds: Vec<Value> = docs
            .iter()
            .filter(|o| CRD_KINDS.contains(&kind_of(o)))
            .cloned()
            .collect();
        for o in &docs {
            let kind = kind_of(o);
            assert!(
                CORE_KINDS.contains(&kind) || CRD_KINDS.contains(&kind) || KSERVE_KINDS.contains(&kind),
                "{overlay}: no check knows kind {kind}"
            );
        }
        if !core.is_empty() {
            kubernetes_validate(&core).unwrap_or_else(|e| panic!("{overlay}: {e}"));
        }
        if !crds.is_empty() {
            let out = validate_crds(&crds).unwrap_or_else(|e| panic!("{overlay}: {e}"));
            assert_eq!(
                out.lines().filter(|l| l.starts_with("ok ")).count(),
                crds.len(),
                "{out}"
            );
        }
    }
    assert_eq!(OVERLAYS.len(), expected.len(), "every overlay is checked");
}

#[test]
fn the_validators_reject_broken_objects() {
    // Negative controls: the checks above would notice a mistake.
    let mut deployment = object(&rendered("service"), "Deployment", "tokitai-serve").clone();
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = json!({});
    let err = kubernetes_validate(&[deployment]).unwrap_err();
    assert!(err.contains("livenesProbe"), "{err}");
    let mut scaled = object(&rendered("service-keda"), "ScaledObject", "tokitai-serve").clone();
    scaled["spec"]["triggers"][0]["metadata"]["threshold"] = json!(0.05);
    let err = validate_crds(&[scaled]).unwrap_err();
    assert!(err.contains("threshold must be string"), "{err}");
    let mut monitor = object(&rendered("monitoring"), "PodMonitor", "tokitai-serve-sidecar").clone();
    monitor["spec"].as_object_mut().unwrap().remove("selector");
    let err = validate_crds(&[monitor]).unwrap_err();
    assert!(err.contains("selector"), "{err}");
}

#[test]
fn kserve_objects_have_the_fields_kserve_requires() {
    let docs = rendered("kserve");
    let runtime = object(&docs, "ServingRuntime", "tokitai-serve");
    assert_eq!(runtime["apiVersion"], "serving.kserve.io/v1alpha1");
    let spec = &runtime["spec"];
    // The CRD requires spec.containers; KServe serves the container named kserve-container.
    let containers = spec["containers"].as_array().expect("spec.containers (required)");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    assert_eq!(c["name"], "kserve-container", "KServe's predictor container name");
    assert!(c["image"].as_str().is_some_and(|i| !i.is_empty()), "container image");
    kubernetes_validate(&[pod_of(spec["containers"].clone())]).unwrap_or_else(|e| panic!("runtime containers: {e}"));
    let formats = spec["supportedModelFormats"].as_array().expect("supportedModelFormats");
    assert!(
        !formats.is_empty() && formats.iter().all(|f| f["name"].is_string()),
        "every format has a name"
    );
    let protocols: BTreeSet<&str> = spec["protocolVersions"]
        .as_array()
        .expect("protocolVersions")
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let known: BTreeSet<&str> = ["v1", "v2", "grpc-v1", "grpc-v2"].into();
    assert!(protocols.is_subset(&known), "KServe's protocol versions: {protocols:?}");
    assert!(
        protocols.contains("v2") && protocols.contains("grpc-v2"),
        "{protocols:?}"
    );
    for name in ["tokitai-moe", "tokitai-moe-grpc"] {
        let isvc = object(&docs, "InferenceService", name);
        assert_eq!(isvc["apiVersion"], "serving.kserve.io/v1beta1");
        let model = &isvc["spec"]["predictor"]["model"];
        assert!(model.is_object(), "{name}: spec.predictor.model");
        let format = model["modelFormat"]["name"]
            .as_str()
            .expect("modelFormat.name (required)");
        assert!(
            formats.iter().any(|f| f["name"] == format),
            "{name}: format {format} is the runtime's"
        );
        assert_eq!(model["runtime"], runtime["metadata"]["name"], "{name}: runtime");
        let protocol = model["protocolVersion"].as_str().expect("protocolVersion");
        assert!(
            protocols.contains(protocol),
            "{name}: {protocol} is one the runtime serves"
        );
        let uri = model["storageUri"].as_str().expect("storageUri");
        let scheme = uri.split("://").next().unwrap();
        assert!(
            ["pvc", "s3", "gs", "hdfs", "http", "https", "oci"].contains(&scheme),
            "{name}: {uri}"
        );
        if let Some(ports) = model.get("ports") {
            let wrapped = json!([{"name": "x", "image": "x", "ports": ports}]);
            kubernetes_validate(&[pod_of(wrapped)]).unwrap_or_else(|e| panic!("{name} ports: {e}"));
            // Knative routes the one port it is given; h2c marks it gRPC.
            assert_eq!(ports.as_array().map(Vec::len), Some(1), "{name}: one port");
            assert_eq!(ports[0]["name"], "h2c", "{name}");
        }
    }
}

#[test]
fn base_config_toml_is_config_default_toml() {
    let shipped = std::fs::read(repo_root().join("config/default.toml")).unwrap();
    let copy = std::fs::read(repo_root().join("deploy/kubernetes/base/config.toml")).unwrap();
    assert!(
        shipped == copy,
        "deploy/kubernetes/base/config.toml differs from config/default.toml: run \
         `cp config/default.toml deploy/kubernetes/base/config.toml`"
    );
    // What every overlay mounts is that file.
    for overlay in ["service", "sidecar"] {
        let text = config_map_toml(&rendered(overlay));
        assert!(
            text.as_bytes() == shipped,
            "{overlay}: the ConfigMap's config.toml is config/default.toml"
        );
    }
}

// ---- tests: the image --------------------------------------------------------

/// The stages of a Dockerfile: (FROM line, its instructions).
fn stages(dockerfile: &str) -> Vec<(String, Vec<String>)> {
    let mut joined = Vec::new();
    let mut current = String::new();
    for line in dockerfile.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(line);
                joined.push(std::mem::take(&mut current));
            }
        }
    }
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for instr in joined {
        if instr.starts_with("FROM ") {
            out.push((instr, Vec::new()));
        } else if let Some(stage) = out.last_mut() {
            stage.1.push(instr);
        }
    }
    out
}

#[test]
fn dockerfile_passes_hadolint_and_builds_with_the_ci_command() {
    let hadolint = deploy::deploy_venv().join("bin/hadolint");
    let (ok, out, err) = deploy::run(Command::new(hadolint).arg(repo_root().join("deploy/Dockerfile")), b"");
    assert!(ok, "hadolint deploy/Dockerfile:\n{out}{err}");
    let text = std::fs::read_to_string(repo_root().join("deploy/Dockerfile")).unwrap();
    let stages = stages(&text);
    assert_eq!(stages.len(), 2, "a build stage and a runtime stage");
    for (from, _) in &stages {
        let image = from.split_whitespace().nth(1).unwrap();
        let tag = image.split_once(':').map(|(_, t)| t).unwrap_or("");
        assert!(!tag.is_empty() && tag != "latest", "{from}: a pinned tag, not latest");
    }
    let (build_from, build) = &stages[0];
    assert!(
        build_from.contains("rust:") && build_from.ends_with(" AS build"),
        "{build_from}"
    );
    let ci = std::fs::read_to_string(repo_root().join(".ci/run")).unwrap();
    let command = "cargo build --release --locked";
    assert!(
        build.iter().any(|i| i.starts_with("RUN ") && i.contains(command)),
        "the build stage runs `{command}`"
    );
    assert!(
        ci.lines().any(|l| l.trim() == command),
        ".ci/run runs `{command}`, the Dockerfile's build"
    );
    let (runtime_from, runtime) = &stages[1];
    assert!(
        runtime_from.starts_with("FROM debian:") && runtime_from.contains("slim"),
        "{runtime_from}"
    );
    let user = runtime
        .iter()
        .rev()
        .find_map(|i| i.strip_prefix("USER "))
        .expect("USER in the runtime stage");
    let uid: u32 = user
        .split(':')
        .next()
        .unwrap()
        .parse()
        .expect("a numeric user (runAsNonRoot can check it)");
    assert_ne!(uid, 0, "not root");
    let entrypoint = runtime
        .iter()
        .find_map(|i| i.strip_prefix("ENTRYPOINT "))
        .expect("ENTRYPOINT");
    let argv: Vec<String> = serde_json::from_str(entrypoint).expect("exec-form ENTRYPOINT (no shell)");
    assert_eq!(argv, ["/usr/local/bin/tokitai-serve"]);
    let cmd = runtime.iter().find_map(|i| i.strip_prefix("CMD ")).expect("CMD");
    let args: Vec<String> = serde_json::from_str(cmd).expect("exec-form CMD");
    let mut argv = vec!["tokitai-serve".to_string()];
    argv.extend(args);
    Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("the image's CMD {argv:?}: {e}"));
    assert!(
        !runtime.iter().any(|i| i.starts_with("RUN ")),
        "the runtime stage runs nothing (no shell needed)"
    );
    let ignore = std::fs::read_to_string(repo_root().join(".dockerignore")).unwrap();
    for needed in ["target/", ".git/"] {
        assert!(ignore.lines().any(|l| l == needed), ".dockerignore leaves out {needed}");
    }
}

// ---- the engine's containers -----------------------------------------------

/// The engine's containers in the rendered overlays: (where, pod spec, container).
fn engine_containers() -> Vec<(String, Value, Value)> {
    let service = rendered("service");
    let pod = object(&service, "Deployment", "tokitai-serve")["spec"]["template"]["spec"].clone();
    let mut out = vec![(
        "service".to_string(),
        pod.clone(),
        container(&pod, "tokitai-serve").clone(),
    )];
    let sidecar = rendered("sidecar");
    let pod = object(&sidecar, "Deployment", "search")["spec"]["template"]["spec"].clone();
    out.push((
        "sidecar".to_string(),
        pod.clone(),
        container(&pod, "tokitai-serve").clone(),
    ));
    let kserve = rendered("kserve");
    let spec = object(&kserve, "ServingRuntime", "tokitai-serve")["spec"].clone();
    out.push((
        "kserve".to_string(),
        spec.clone(),
        container(&spec, "kserve-container").clone(),
    ));
    out
}

/// The config.toml of the rendered engine ConfigMap.
fn config_map_toml(docs: &[Value]) -> String {
    docs.iter()
        .find(|d| {
            d["kind"] == "ConfigMap"
                && d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("tokitai-serve-config"))
        })
        .and_then(|m| m["data"]["config.toml"].as_str())
        .expect("the tokitai-serve-config ConfigMap with config.toml")
        .to_string()
}

fn args_of(c: &Value) -> Vec<String> {
    c["args"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

fn env_of(c: &Value) -> Vec<(String, String)> {
    c["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_string(),
                e["value"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// The value of `--flag=value` (or `--flag value`) in `args`.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().enumerate().find_map(|(i, a)| {
        a.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('='))
            .or_else(|| (a == name).then(|| args.get(i + 1).map(String::as_str)).flatten())
    })
}

/// The containerPort of `c` named `name`.
fn port_named(c: &Value, name: &str) -> Option<u64> {
    c["ports"].as_array()?.iter().find(|p| p["name"] == name)?["containerPort"].as_u64()
}

/// The ConfigMap's config.toml where the container's `--config` points (it
/// must be the mounted ConfigMap), written to `dir`; None without `--config`.
fn mounted_config(pod: &Value, c: &Value, docs_toml: &str, dir: &std::path::Path) -> Option<std::path::PathBuf> {
    let args = args_of(c);
    let path = flag(&args, "--config")?;
    let (mount_dir, file) = path.rsplit_once('/').expect("an absolute --config path");
    let mount = c["volumeMounts"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["mountPath"] == mount_dir))
        .unwrap_or_else(|| panic!("--config {path}: nothing is mounted at {mount_dir}"));
    let volume = pod["volumes"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["name"] == mount["name"]))
        .expect("the mount's volume");
    let name = volume["configMap"]["name"]
        .as_str()
        .expect("--config comes from a ConfigMap volume");
    assert!(name.starts_with("tokitai-serve-config"), "{name}");
    assert_eq!(file, "config.toml", "the ConfigMap's key");
    let out = dir.join("config.toml");
    std::fs::write(&out, docs_toml).unwrap();
    Some(out)
}

/// Every flag a manifest may pass to the engine, and the setting it sets.
/// A flag missing here fails the test: add it with its setting.
const FLAG_SETTINGS: [(&str, &str); 9] = [
    ("--config", ""),
    ("--bind", "server.bind"),
    ("--grpc-bind", "grpc.bind"),
    ("--model-repository", "model.repository"),
    ("--model-control-mode", "model.control_mode"),
    ("--repository-poll-secs", "model.repository_poll_secs"),
    ("--weight-precision", "model.weight_precision"),
    ("--max-request-rows", "batching.max_request_rows"),
    ("--max-queue-rows", "batching.max_queue_rows"),
];

/// The configuration the engine would run with: the container's arguments
/// through the engine's own parser, its environment, and the mounted
/// ConfigMap, through the engine's own loader.
fn load_engine_config(pod: &Value, c: &Value, toml: &str, with_args: bool) -> Result<Config, String> {
    let dir = tempfile::tempdir().unwrap();
    let file = mounted_config(pod, c, toml, dir.path());
    let overrides = if with_args {
        let mut argv = vec!["tokitai-serve".to_string()];
        argv.extend(args_of(c));
        let cli = Cli::try_parse_from(&argv).map_err(|e| format!("the engine's parser refuses {argv:?}: {e}"))?;
        assert!(cli.command.is_none(), "the arguments serve");
        cli.serve.overrides()
    } else {
        Vec::new()
    };
    Config::load(file.as_deref(), env_of(c), &overrides).map_err(|e| e.to_string())
}

/// `section.key` of `config`, as the TOML value it serialises to.
fn setting(config: &Config, path: &str) -> Option<toml::Value> {
    let (section, key) = path.split_once('.')?;
    let all = toml::Value::try_from(config).expect("the configuration serialises");
    all.get(section)?.get(key).cloned()
}

fn socket(config: &Config, path: &str) -> std::net::SocketAddr {
    let text = setting(config, path).and_then(|v| v.as_str().map(str::to_string));
    text.unwrap_or_else(|| panic!("{path} is not set"))
        .parse()
        .expect("an IP:port")
}

fn pre_stop_sleep(c: &Value) -> u64 {
    c["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .expect("a preStop sleep")
}

/// Needs the model-repository (issue 14) and gRPC (issue 15) flags and
/// settings: until both are in the engine, this test fails, naming the first
/// one missing.
#[test]
fn engine_arguments_and_environment_load_with_the_engines_parser_and_config() {
    let toml = config_map_toml(&rendered("service"));
    let grpc_isvc = object(&rendered("kserve"), "InferenceService", "tokitai-moe-grpc").clone();
    let h2c = grpc_isvc["spec"]["predictor"]["model"]["ports"][0]["containerPort"].as_u64();
    for (place, pod, c) in engine_containers() {
        let config = load_engine_config(&pod, &c, &toml, true).unwrap_or_else(|e| panic!("{place}: {e}"));
        assert_arguments_are_settings(&place, &c, &config);
        assert_binds_match_the_ports(&place, &c, &config, h2c);
        assert_repository_and_grace(&place, &pod, &c, &config);
    }
}

/// Each `--flag=value` of container `c` (at `place`) is the value of the
/// setting it names in the `config` the engine loaded.
fn assert_arguments_are_settings(place: &str, c: &Value, config: &Config) {
    for arg in args_of(c) {
        let (name, value) = arg
            .split_once('=')
            .unwrap_or_else(|| panic!("{place}: write {arg} as --flag=value"));
        let (_, path) = FLAG_SETTINGS
            .iter()
            .find(|(f, _)| *f == name)
            .unwrap_or_else(|| panic!("{place}: {name} is not in FLAG_SETTINGS"));
        if path.is_empty() {
            continue;
        }
        let got = setting(config, path).unwrap_or_else(|| panic!("{place}: {name}: the engine has no setting {path}"));
        let same = match &got {
            toml::Value::String(s) => s == value,
            toml::Value::Integer(n) => value.parse() == Ok(*n),
            toml::Value::Float(f) => value.parse() == Ok(*f),
            other => other.to_string() == value,
        };
        assert!(same, "{place}: {name}={value} but {path} = {got}");
    }
}

/// HTTP and gRPC bind where the container's ports (or, for KServe, its
/// convention and the gRPC InferenceService's port `h2c`) say.
fn assert_binds_match_the_ports(place: &str, c: &Value, config: &Config, h2c: Option<u64>) {
    let http = socket(config, "server.bind");
    assert!(
        http.ip().is_unspecified(),
        "{place}: HTTP must be reachable on the pod IP (probes): {http}"
    );
    let grpc = socket(config, "grpc.bind");
    assert_eq!(
        setting(config, "grpc.enabled"),
        Some(toml::Value::Boolean(true)),
        "{place}: gRPC on"
    );
    match place {
        "service" => {
            assert_eq!(
                Some(u64::from(http.port())),
                port_named(c, "http"),
                "service: http port"
            );
            assert_eq!(
                Some(u64::from(grpc.port())),
                port_named(c, "grpc"),
                "service: grpc port"
            );
            assert!(grpc.ip().is_unspecified(), "service: gRPC on the pod IP");
        }
        "sidecar" => {
            assert_eq!(
                Some(u64::from(http.port())),
                port_named(c, "tokitai-http"),
                "sidecar: http port"
            );
            assert!(grpc.ip().is_loopback(), "sidecar: gRPC for search alone");
        }
        _ => {
            assert_eq!(http.port(), 8080, "kserve: KServe's HTTP port");
            assert_eq!(
                Some(u64::from(grpc.port())),
                h2c,
                "kserve: the gRPC InferenceService's port"
            );
        }
    }
}

/// The repository is where the overlay mounts models, and the pod's grace
/// period outlasts preStop plus the engine's shutdown timeout.
fn assert_repository_and_grace(place: &str, pod: &Value, c: &Value, config: &Config) {
    assert_eq!(
        setting(config, "model.repository")
            .and_then(|v| v.as_str().map(str::to_string))
            .as_deref(),
        Some(if place == "kserve" { "/mnt/models" } else { "/models" }),
        "{place}: model.repository"
    );
    if let Some(grace) = pod["terminationGracePeriodSeconds"].as_u64() {
        let drain = pre_stop_sleep(c) + config.server.shutdown_timeout_secs;
        assert!(
            grace > drain,
            "{place}: grace {grace} s must exceed preStop + shutdown_timeout_secs = {drain} s"
        );
    }
}

/// A probe whose failures kill the pod must tolerate this much silence: about
/// nine times a Full model's measured load (6.5 s for 3.2 GB, warm disk).
const MIN_LIVENESS_TOLERANCE_S: u64 = 60;
/// A startup probe must wait at least this long for a cold-disk load.
const MIN_STARTUP_BUDGET_S: u64 = 300;

/// (kind, path, port) of every HTTP probe of `c`, with the budget checks.
fn probes(place: &str, c: &Value) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    for kind in ["startupProbe", "readinessProbe", "livenessProbe"] {
        let probe = &c[kind];
        if probe.is_null() {
            continue;
        }
        let get = &probe["httpGet"];
        let path = get["path"]
            .as_str()
            .unwrap_or_else(|| panic!("{place} {kind}: an httpGet path"));
        let n = |k: &str, default: u64| probe[k].as_u64().unwrap_or(default);
        let budget = n("initialDelaySeconds", 0) + n("periodSeconds", 10) * n("failureThreshold", 3);
        match kind {
            "startupProbe" => assert!(budget >= MIN_STARTUP_BUDGET_S, "{place}: startup budget {budget} s"),
            "livenessProbe" => assert!(
                budget >= MIN_LIVENESS_TOLERANCE_S,
                "{place}: liveness tolerates {budget} s"
            ),
            _ => {}
        }
        assert!(
            n("timeoutSeconds", 1) >= 2,
            "{place} {kind}: a busy engine gets 2 s to answer"
        );
        out.push((kind.to_string(), path.to_string(), get["port"].clone()));
    }
    out
}

#[test]
fn probes_env_and_scrape_paths_are_ones_a_real_engine_has() {
    let engine = TestServer::start(base_config());
    let agent = agent();
    let mut paths = BTreeSet::new();
    for (place, _pod, c) in engine_containers() {
        paths.extend(checked_probe_paths(&place, &c));
        assert_env_names_settings(&place, &c);
    }
    paths.extend(scrape_paths());
    for path in &paths {
        let r = get(&agent, &engine.url(path));
        assert_eq!(r.status, 200, "GET {path} on a real engine");
        if path == "/metrics" {
            assert!(
                r.text().contains("tokitai_queue_wait_seconds_count"),
                "the autoscaling metric is exported"
            );
        }
    }
    engine.shutdown();
}

/// The probes of container `c` (at `place`): liveness and readiness (and
/// startup, with /models mounted read-only, outside KServe), each on a
/// route of its kind and on a port the container has. Their paths.
fn checked_probe_paths(place: &str, c: &Value) -> Vec<String> {
    let mut paths = Vec::new();
    let probes = probes(place, c);
    assert!(probes.iter().any(|p| p.0 == "livenessProbe") && probes.iter().any(|p| p.0 == "readinessProbe"));
    if place != "kserve" {
        assert!(probes.iter().any(|p| p.0 == "startupProbe"), "{place}: a startup probe");
        let mounts = c["volumeMounts"].as_array().expect("volume mounts");
        assert!(
            mounts
                .iter()
                .any(|m| m["mountPath"] == "/models" && m["readOnly"] == true),
            "{place}: /models, read-only"
        );
    }
    for (kind, path, port) in probes {
        let route = Route::for_path(&path);
        let wanted: &[Route] = if kind == "livenessProbe" {
            &[Route::Healthz, Route::V2Live]
        } else {
            &[Route::Readyz, Route::V2Ready]
        };
        assert!(
            wanted.contains(&route),
            "{place} {kind}: {path} is not a {wanted:?} route"
        );
        match &port {
            Value::String(name) => assert!(port_named(c, name).is_some(), "{place} {kind}: no port named {name}"),
            Value::Number(n) => {
                let args = args_of(c);
                let bind = flag(&args, "--bind").expect("--bind");
                assert_eq!(
                    bind.rsplit(':').next(),
                    Some(n.to_string().as_str()),
                    "{place} {kind}: port {n} is --bind's"
                );
            }
            other => panic!("{place} {kind}: port {other}"),
        }
        paths.push(path);
    }
    paths
}

/// Every TOKITAI_* variable of container `c` is a setting (unknown ones
/// would be ignored): loaded alone, it sets a setting the loaded
/// configuration has (an optional one, unset by default, included).
fn assert_env_names_settings(place: &str, c: &Value) {
    for (name, value) in env_of(c) {
        let rest = name
            .strip_prefix("TOKITAI_")
            .unwrap_or_else(|| panic!("{place}: {name} is not the engine's"));
        let loaded = Config::load(None, [(name.clone(), value.clone())], &[])
            .unwrap_or_else(|e| panic!("{place}: {name}={value}: {e}"));
        let all = toml::Value::try_from(loaded).unwrap();
        let known = all.as_table().unwrap().iter().any(|(section, keys)| {
            rest.to_ascii_lowercase()
                .strip_prefix(&format!("{section}_"))
                .is_some_and(|k| keys.get(k).is_some())
        });
        assert!(known, "{place}: {name} names no setting");
    }
}

/// The metrics paths the monitoring overlay and the scrape job use, each a
/// metrics route.
fn scrape_paths() -> Vec<String> {
    let mut paths = Vec::new();
    let monitoring = rendered("monitoring");
    let job = yaml_file("deploy/kubernetes/overlays/monitoring/prometheus-scrape-job.yml");
    let scrape_paths = [
        &object(&monitoring, "ServiceMonitor", "tokitai-serve")["spec"]["endpoints"][0]["path"],
        &object(&monitoring, "PodMonitor", "tokitai-serve-sidecar")["spec"]["podMetricsEndpoints"][0]["path"],
        &job["scrape_configs"][0]["metrics_path"],
    ];
    for path in scrape_paths {
        let path = path.as_str().expect("a metrics path");
        assert_eq!(Route::for_path(path), Route::Metrics, "{path}");
        paths.push(path.to_string());
    }
    paths
}

/// The Secret the `service` overlay's API keys come from, and its key.
const KEYS_SECRET: (&str, &str) = ("tokitai-api-keys", "api-keys");

/// `file` (server.api_keys_file) is the Secret's key, mounted read-only and
/// readable by no one outside the pod's group.
fn assert_keys_mounted_from_the_secret(place: &str, pod: &Value, c: &Value, file: &std::path::Path) {
    let dir = file.parent().and_then(|d| d.to_str()).expect("an absolute path");
    let name = file.file_name().and_then(|n| n.to_str()).expect("a file name");
    let mount = c["volumeMounts"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["mountPath"] == dir))
        .unwrap_or_else(|| panic!("{place}: nothing is mounted at {dir}"));
    assert_eq!(mount["readOnly"], true, "{place}: the keys are mounted read-only");
    let volume = pod["volumes"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["name"] == mount["name"]))
        .expect("the mount's volume");
    let secret = &volume["secret"];
    assert_eq!(secret["secretName"], KEYS_SECRET.0, "{place}: {volume}");
    let items = secret["items"].as_array().expect("only the keys file is projected");
    assert_eq!(items, &[json!({"key": KEYS_SECRET.1, "path": name})], "{place}");
    let mode = secret["defaultMode"].as_u64().expect("a defaultMode");
    assert_eq!(
        mode & 0o007,
        0,
        "{place}: the keys file is not world-readable ({mode:o})"
    );
    assert_eq!(
        pod["securityContext"]["fsGroup"], pod["securityContext"]["runAsGroup"],
        "{place}: the engine's group owns the file"
    );
}

#[test]
fn the_service_overlay_reads_api_keys_from_a_secret_and_prometheus_scrapes_without_one() {
    let toml = config_map_toml(&rendered("service"));
    let mut metrics_scope = None;
    for overlay in ["service", "service-keda"] {
        let docs = rendered(overlay);
        assert!(
            !docs.iter().any(|d| d["kind"] == "Secret"),
            "{overlay}: no key is rendered from the repository"
        );
        let pod = &object(&docs, "Deployment", "tokitai-serve")["spec"]["template"]["spec"];
        let c = container(pod, "tokitai-serve");
        let config = load_engine_config(pod, c, &toml, true).unwrap_or_else(|e| panic!("{overlay}: {e}"));
        let file = config.server.api_keys_file.clone();
        let file = file.unwrap_or_else(|| panic!("{overlay}: server.api_keys_file is set"));
        assert_keys_mounted_from_the_secret(overlay, pod, c, &file);
        assert_eq!(config.server.metadata_scope.scope(), Some(Scope::Metadata), "{overlay}");
        assert_eq!(
            config.server.metrics_scope.scope(),
            None,
            "{overlay}: Prometheus scrapes without a key"
        );
        metrics_scope = Some(config.server.metrics_scope);
    }
    // The loopback sidecar and KServe's runtime ask for none.
    for (place, pod, c) in engine_containers().into_iter().filter(|(p, ..)| p != "service") {
        let config = load_engine_config(&pod, &c, &toml, true).unwrap_or_else(|e| panic!("{place}: {e}"));
        assert_eq!(config.server.api_keys_file, None, "{place}");
    }
    // Prometheus sends no credentials (monitoring overlay, scrape job) ...
    let monitoring = rendered("monitoring");
    let endpoint = &object(&monitoring, "ServiceMonitor", "tokitai-serve")["spec"]["endpoints"][0];
    let job = &yaml_file("deploy/kubernetes/overlays/monitoring/prometheus-scrape-job.yml")["scrape_configs"][0];
    for field in [
        "authorization",
        "bearerTokenSecret",
        "bearerTokenFile",
        "basicAuth",
        "bearer_token_file",
    ] {
        assert!(endpoint.get(field).is_none() && job.get(field).is_none(), "{field}");
    }
    // ... and an engine with the overlay's key settings answers it and the
    // probes without a key, and nothing else.
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join(KEYS_SECRET.1);
    std::fs::write(&keys, "metadata-key-0123456789abcdef metadata\n").unwrap();
    let mut config = base_config();
    config.server.api_keys_file = Some(keys);
    config.server.metrics_scope = metrics_scope.expect("the service overlay's metrics_scope");
    let engine = TestServer::start(config);
    let a = agent();
    let service = rendered("service");
    let pod = &object(&service, "Deployment", "tokitai-serve")["spec"]["template"]["spec"];
    let mut paths = checked_probe_paths("service", container(pod, "tokitai-serve"));
    paths.extend(scrape_paths());
    for path in &paths {
        assert_eq!(get(&a, &engine.url(path)).status, 200, "GET {path} without a key");
    }
    let metadata = engine.url("/v2/models/tokitai-moe");
    assert_eq!(get(&a, &metadata).status, 401, "metadata needs a key");
    let with_key = a
        .get(&metadata)
        .set("Authorization", "Bearer metadata-key-0123456789abcdef");
    assert_eq!(finish(with_key.call()).unwrap().status, 200, "and takes one");
    engine.shutdown();
}

#[test]
fn drain_arithmetic_holds_for_the_mounted_configuration() {
    let toml = config_map_toml(&rendered("service"));
    for (place, pod, c) in engine_containers().into_iter().filter(|(p, ..)| p != "kserve") {
        // File and environment only: the flags are checked with the parser above.
        let config = load_engine_config(&pod, &c, &toml, false).unwrap_or_else(|e| panic!("{place}: {e}"));
        let grace = pod["terminationGracePeriodSeconds"]
            .as_u64()
            .expect("terminationGracePeriodSeconds");
        let drain = pre_stop_sleep(&c) + config.server.shutdown_timeout_secs;
        assert!(
            grace > drain,
            "{place}: grace {grace} s must exceed preStop + shutdown_timeout_secs = {drain} s"
        );
    }
    // Sidecar: search stops sending before the engine drains.
    let sidecar = rendered("sidecar");
    let pod = &object(&sidecar, "Deployment", "search")["spec"]["template"]["spec"];
    let (search, engine) = (container(pod, "search"), container(pod, "tokitai-serve"));
    assert!(
        pre_stop_sleep(engine) > pre_stop_sleep(search),
        "the engine's preStop outlasts search's"
    );
    let url = env_of(search)
        .into_iter()
        .find(|(k, _)| k == "TOKITAI_MODEL_URL")
        .map(|(_, v)| v);
    assert_eq!(
        url.as_deref(),
        Some("http://127.0.0.1:9100"),
        "search calls the engine on loopback"
    );
}

#[test]
fn services_monitors_and_autoscalers_agree_with_the_deployment() {
    let service = rendered("service");
    let deployment = object(&service, "Deployment", "tokitai-serve");
    let pod = &deployment["spec"]["template"];
    let engine = container(&pod["spec"], "tokitai-serve");
    let selector = &deployment["spec"]["selector"]["matchLabels"];
    let svc = object(&service, "Service", "tokitai-serve");
    let names: Vec<&str> = svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["http", "grpc"], "Service ports named for the protocol");
    for p in svc["spec"]["ports"].as_array().unwrap() {
        let target = p["targetPort"].as_str().expect("a named targetPort");
        assert_eq!(port_named(engine, target), p["port"].as_u64(), "{target}");
    }
    assert_eq!(&svc["spec"]["selector"], selector);
    assert_eq!(
        &object(&service, "PodDisruptionBudget", "tokitai-serve")["spec"]["selector"]["matchLabels"],
        selector
    );
    let hpa = object(&service, "HorizontalPodAutoscaler", "tokitai-serve");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], deployment["metadata"]["name"]);
    let metric = &hpa["spec"]["metrics"][0]["pods"];
    let rule = &yaml_file("deploy/kubernetes/overlays/service/prometheus-adapter-rules.yaml")["rules"][0];
    assert_eq!(
        metric["metric"]["name"], rule["name"]["as"],
        "the HPA asks for the adapter's metric"
    );
    assert_eq!(metric["target"]["averageValue"], "50m");
    let keda = rendered("service-keda");
    assert!(
        !keda.iter().any(|o| o["kind"] == "HorizontalPodAutoscaler"),
        "KEDA owns the only HPA"
    );
    let scaled = object(&keda, "ScaledObject", "tokitai-serve");
    assert_eq!(scaled["spec"]["scaleTargetRef"]["name"], deployment["metadata"]["name"]);
    let trigger = &scaled["spec"]["triggers"][0];
    assert_eq!(trigger["metadata"]["threshold"], "0.05", "the HPA's 50m");
    let namespace = deployment["metadata"]["namespace"].as_str().expect("a namespace");
    let query = trigger["metadata"]["query"].as_str().unwrap();
    assert_eq!(
        query.matches(&format!("namespace=\"{namespace}\"")).count(),
        2,
        "KEDA's query names the namespace: {query}"
    );
    let monitoring = rendered("monitoring");
    let sm = &object(&monitoring, "ServiceMonitor", "tokitai-serve")["spec"];
    assert!(
        names.contains(&sm["endpoints"][0]["port"].as_str().unwrap()),
        "ServiceMonitor port is a Service port"
    );
    for (k, v) in sm["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(&svc["metadata"]["labels"][k], v, "ServiceMonitor selects the Service");
    }
    let sidecar = rendered("sidecar");
    let search = &object(&sidecar, "Deployment", "search")["spec"]["template"];
    let pm = &object(&monitoring, "PodMonitor", "tokitai-serve-sidecar")["spec"];
    let port = pm["podMetricsEndpoints"][0]["port"].as_str().unwrap();
    assert!(
        port_named(container(&search["spec"], "tokitai-serve"), port).is_some(),
        "PodMonitor port {port}"
    );
    for (k, v) in pm["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(
            &search["metadata"]["labels"][k], v,
            "PodMonitor selects the sidecar pods"
        );
    }
}
