//! The deploy/ manifests as the tests read them: rendered by `kubectl
//! kustomize`, turned from YAML into JSON values by PyYAML in the deploy
//! checks' virtual environment.
//!
//! Owns: where the overlays and the check tools are ([`OVERLAYS`],
//! [`deploy_venv`], [`kubectl`]), [`rendered`] (an overlay's objects) and
//! [`yaml_file`]. Must not touch: the manifests themselves. The tools are
//! installed by `deploy/check/install.sh` (which `.ci/run` calls); without
//! them these tests fail with that hint, never skip.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

/// Every overlay under deploy/kubernetes/overlays.
pub const OVERLAYS: [&str; 5] = ["service", "service-keda", "sidecar", "kserve", "monitoring"];

const HINT: &str = "run `bash deploy/check/install.sh` (what .ci/run does) to install the deploy checks' tools";

pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `kubectl` from `$KUBECTL`, `PATH` or /usr/bin.
pub fn kubectl() -> PathBuf {
    if let Some(p) = std::env::var_os("KUBECTL").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")])
        .map(|dir| dir.join("kubectl"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`kubectl` was not found on PATH (needed for `kubectl kustomize`)"))
}

/// The deploy checks' Python environment: `$TOKITAI_DEPLOY_VENV` or target/deploy-venv.
pub fn deploy_venv() -> PathBuf {
    let dir = std::env::var_os("TOKITAI_DEPLOY_VENV")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/deploy-venv"));
    assert!(
        dir.join("bin/python").is_file(),
        "no virtual environment at {}: {HINT}",
        dir.display()
    );
    dir
}

/// target/deploy-npm, where the KEDA and Prometheus-operator models are installed.
pub fn deploy_npm() -> PathBuf {
    let dir = repo_root().join("target/deploy-npm");
    assert!(
        dir.join("node_modules/@kubernetes-models/keda").is_dir(),
        "no npm packages in {}: {HINT}",
        dir.display()
    );
    dir
}

/// Runs `cmd` with `stdin`; (success, stdout, stderr).
pub fn run(cmd: &mut Command, stdin: &[u8]) -> (bool, String, String) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut pipe = child.stdin.take().expect("stdin is piped");
    pipe.write_all(stdin).expect("the child reads its stdin");
    drop(pipe);
    let out = child.wait_with_output().expect("the child runs");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

/// `kubectl kustomize` of one overlay, as YAML.
pub fn render(overlay: &str) -> String {
    let dir = repo_root().join("deploy/kubernetes/overlays").join(overlay);
    let (ok, out, err) = run(Command::new(kubectl()).arg("kustomize").arg(&dir), b"");
    assert!(ok, "kubectl kustomize {} failed:\n{err}", dir.display());
    out
}

/// Every document of a YAML stream, as JSON values.
pub fn yaml_docs(yaml: &str) -> Vec<Value> {
    let python = deploy_venv().join("bin/python");
    let script = repo_root().join("deploy/check/yaml2json.py");
    let (ok, out, err) = run(Command::new(python).arg(script), yaml.as_bytes());
    assert!(ok, "yaml2json failed: {err}");
    match serde_json::from_str(&out).expect("yaml2json prints JSON") {
        Value::Array(docs) => docs,
        other => panic!("yaml2json printed {other}"),
    }
}

/// An overlay's rendered objects.
pub fn rendered(overlay: &str) -> Vec<Value> {
    yaml_docs(&render(overlay))
}

/// A single-document YAML file of the repository (path relative to its root).
pub fn yaml_file(path: &str) -> Value {
    let text = std::fs::read_to_string(repo_root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut docs = yaml_docs(&text);
    assert_eq!(docs.len(), 1, "{path} holds one document");
    docs.remove(0)
}

/// The object of `kind` named `name` among `docs`.
pub fn object<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} among the rendered objects"))
}

/// The container `name` of a pod spec.
pub fn container<'a>(pod_spec: &'a Value, name: &str) -> &'a Value {
    pod_spec["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no container {name} in the pod spec"))
}
