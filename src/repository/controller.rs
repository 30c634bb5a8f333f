//! When and what to load: start-up, SIGHUP, polling, and the load / unload
//! API, in the model control mode the configuration names.
//!
//! Owns: the source of models ([`Source`]: a repository folder, the
//! `--arch/--checkpoint` files, or the demo model), the choice of the
//! version to serve (the highest version whose files have not already failed
//! to load; the served one again only when its files changed), the load of
//! a new version off the request path (read, pack, warm up on a blocking
//! thread; start its pool), the interface check against the version it
//! replaces, the switch, the bookkeeping of failures (index, log,
//! `tokitai_model_load_failures_total`), draining on unload, and giving the
//! memory of a retired version back. One change at a time (one lock).
//! Retiring a version waits on its events (`served::Retirement`: drained
//! when its last request is answered, freed when its pool ended), never a
//! sleep loop. Must not touch: requests (they resolve through the
//! registry), how a version is built or retired (`served/`), the engine
//! facade above it.
//!
//! Modes (Triton's names): `none` reads the models at start-up and re-reads
//! them on SIGHUP; `poll` also re-reads every `model.repository_poll_secs`;
//! `explicit` loads every model at start-up, then changes only through
//! `load` / `unload` (and SIGHUP, which re-reads the models that are loaded,
//! and leaves unloaded ones unloaded).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::RepositoryError;
use super::index::VersionRecord;
use super::layout::{self, ARCH_FILE, CHECKPOINT_FILE, FileStamp, ModelDir};
use super::model_config::effective_config;
use super::registry::{ModelSlot, Registry};
use crate::config::{Config, ControlMode};
use crate::error::StartError;
use crate::labels::ModelState;
use crate::metrics::Metrics;
use crate::served::build::{Prepared, prepare, start_pool};
use crate::served::{Retirement, ServedVersion};

/// Where the models come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `model.repository`: every model folder in it.
    Repository(PathBuf),
    /// `model.arch` + `model.checkpoint`: one model (`model.name`) whose
    /// version is the checkpoint's training step.
    Files { arch: PathBuf, checkpoint: PathBuf },
    /// Neither: the built-in demo model, version 0.
    Demo,
}

impl Source {
    /// The repository when one is given; else the files, or the demo model
    /// (`Config::model_files`, the same rule as `model::load_files_or_demo`).
    pub fn of(config: &Config) -> Source {
        match (&config.model.repository, config.model_files()) {
            (Some(dir), _) => Source::Repository(dir.clone()),
            (None, Some((arch, checkpoint))) => Source::Files {
                arch: arch.to_path_buf(),
                checkpoint: checkpoint.to_path_buf(),
            },
            (None, None) => Source::Demo,
        }
    }
}

/// One version that could be loaded.
#[derive(Debug, Clone)]
struct Candidate {
    /// The folder's number; `None` for the `--arch/--checkpoint` files,
    /// whose version is the checkpoint's step, known once read.
    version: Option<u64>,
    /// `(arch.json, checkpoint.tkp1)`; `None` for the demo model.
    files: Option<(PathBuf, PathBuf)>,
    /// The model's `config.toml` (repository models only).
    config_file: Option<PathBuf>,
    stamp: FileStamp,
}

/// What one model's re-read did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The served version's files are the same: nothing to do.
    Unchanged,
    /// Version `n` now serves.
    Loaded(u64),
    /// Nothing could be loaded; the reason of the last failure. Whatever
    /// served before still serves.
    Failed(String),
}

/// Loads, swaps and unloads model versions.
pub struct Controller {
    mode: ControlMode,
    source: Source,
    base: Config,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    /// One change at a time.
    lock: tokio::sync::Mutex<()>,
}

impl Controller {
    pub fn new(config: &Config, registry: Arc<Registry>, metrics: Arc<Metrics>) -> Controller {
        Controller {
            mode: config.model.control_mode,
            source: Source::of(config),
            base: config.clone(),
            registry,
            metrics,
            lock: tokio::sync::Mutex::new(()),
        }
    }

    /// Loads every model. With `--arch/--checkpoint` (or the demo model) a
    /// model that fails to load stops start-up with its error; in a
    /// repository a failed model is listed `UNAVAILABLE` with its reason and
    /// the others serve (an unreadable repository stops start-up).
    pub async fn start_up(&self) -> Result<(), StartError> {
        let _one = self.lock.lock().await;
        match &self.source {
            Source::Repository(dir) => {
                let models = layout::scan(dir).map_err(|e| StartError::Repository(e.to_string()))?;
                if models.is_empty() {
                    tracing::warn!(repository = %dir.display(), "the model repository holds no model folder");
                }
                for model in models {
                    self.sync_model(&model.name, false).await;
                }
                Ok(())
            }
            Source::Files { .. } | Source::Demo => {
                let name = self.base.model.name.clone();
                let candidate = self.single_candidate();
                let slot = self.registry.ensure_slot(&name);
                self.metrics.model_known(&name);
                self.load_candidate(&slot, candidate).await.map(|_| ())
            }
        }
    }

    /// Re-reads the models (SIGHUP, or a poll): new versions load and
    /// replace the served ones; in `none` and `poll` modes new model folders
    /// load and removed ones unload, in `explicit` mode only the loaded
    /// models are re-read. Never fails: failures are logged and listed.
    pub async fn refresh(&self, why: &str) {
        if self.registry.is_draining() {
            return;
        }
        let _one = self.lock.lock().await;
        tracing::debug!(why, "re-reading the models");
        let Source::Repository(dir) = &self.source else {
            self.sync_model(&self.base.model.name, false).await;
            return;
        };
        let models = match layout::scan(dir) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(error = %e, why, "cannot read the model repository; serving what is loaded");
                return;
            }
        };
        let on_disk: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
        for name in self.registry.names() {
            if !on_disk.contains(&name.as_str()) {
                tracing::info!(model = %name, "model folder removed from the repository: unloading");
                if let Some(slot) = self.registry.slot(&name) {
                    self.drain_out(&slot).await;
                }
                self.registry.remove_slot(&name);
            }
        }
        for model in &models {
            let loaded = self.registry.slot(&model.name).is_some_and(|s| s.serving().is_some());
            if self.mode == ControlMode::Explicit && !loaded {
                continue;
            }
            self.sync_model(&model.name, false).await;
        }
    }

    /// `POST /v2/repository/models/{name}/load` (explicit mode): loads the
    /// model's highest version, or re-reads it when loaded (files that
    /// failed before are tried again).
    pub async fn load(&self, name: &str) -> Result<Outcome, RepositoryError> {
        self.check_explicit()?;
        let _one = self.lock.lock().await;
        if !self.model_exists(name)? {
            return Err(RepositoryError::UnknownModel {
                action: "load",
                model: name.to_string(),
            });
        }
        match self.sync_model(name, true).await {
            Outcome::Failed(reason) => Err(RepositoryError::LoadFailed {
                model: name.to_string(),
                reason,
            }),
            done => Ok(done),
        }
    }

    /// `POST /v2/repository/models/{name}/unload` (explicit mode): new
    /// requests for the model get "not ready" at once; the requests it
    /// already accepted are answered; then its memory is freed. Returns
    /// once it drained.
    pub async fn unload(&self, name: &str) -> Result<(), RepositoryError> {
        self.check_explicit()?;
        let _one = self.lock.lock().await;
        let slot = self.registry.slot(name).ok_or_else(|| RepositoryError::UnknownModel {
            action: "unload",
            model: name.to_string(),
        })?;
        self.drain_out(&slot).await;
        Ok(())
    }

    fn check_explicit(&self) -> Result<(), RepositoryError> {
        if self.registry.is_draining() {
            return Err(RepositoryError::Draining);
        }
        match self.mode {
            ControlMode::Explicit => Ok(()),
            other => Err(RepositoryError::NotAllowed(other)),
        }
    }

    fn model_exists(&self, name: &str) -> Result<bool, RepositoryError> {
        match &self.source {
            Source::Repository(dir) => Ok(layout::find_model(dir, name)?.is_some()),
            _ => Ok(name == self.base.model.name),
        }
    }

    /// Takes the served version of `slot` out of service and waits until
    /// its accepted requests are answered (at most the shutdown timeout).
    async fn drain_out(&self, slot: &ModelSlot) {
        let Some(old) = slot.swap(None) else {
            return;
        };
        let version = old.version();
        slot.restate(
            Some(version),
            ModelState::Unloading,
            "unloading: answering accepted requests",
        );
        slot.set_reason("unloaded");
        self.metrics.model_unloaded(&old.description().metric_info());
        let started = Instant::now();
        let retirement = old.retirement();
        drop(old);
        let limit = Duration::from_secs(self.base.server.shutdown_timeout_secs.max(1));
        if let Some(mut retirement) = retirement {
            if tokio::time::timeout(limit, retirement.drained()).await.is_err() {
                tracing::warn!(model = %slot.name, version, "unload: requests still running after the shutdown timeout");
            }
            free_when_retired(retirement, slot.name.clone(), version);
        }
        slot.restate(Some(version), ModelState::Unavailable, "unloaded");
        tracing::info!(model = %slot.name, version, drain_ms = started.elapsed().as_millis() as u64, "model unloaded");
    }

    /// Re-reads model `name` and serves its best version (see the module
    /// doc); with `retry`, versions whose files failed before are tried again.
    async fn sync_model(&self, name: &str, retry: bool) -> Outcome {
        let candidates = match self.candidates(name) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(model = name, error = %e, "cannot read the model's folder");
                return Outcome::Failed(e.to_string());
            }
        };
        let slot = self.registry.ensure_slot(name);
        self.metrics.model_known(name);
        let serving = slot.serving();
        if let Source::Repository(_) = self.source {
            let present: Vec<u64> = candidates.iter().filter_map(|c| c.version).collect();
            slot.forget_missing(&present, serving.as_ref().map(|s| s.version()));
        }
        let mut failure = None;
        for candidate in candidates {
            if let Some(s) = &serving {
                let served_stamp = slot.record_of(Some(s.version())).map(|r| r.stamp);
                let same_version = candidate.version.is_none_or(|v| v == s.version());
                if same_version && served_stamp.as_ref() == Some(&candidate.stamp) {
                    return match failure {
                        Some(reason) => Outcome::Failed(format!("{reason} (version {} keeps serving)", s.version())),
                        None => Outcome::Unchanged,
                    };
                }
            }
            let known_failure = slot
                .record_of(candidate.version)
                .is_some_and(|r| r.state == ModelState::Unavailable && r.stamp == candidate.stamp);
            if known_failure && !retry {
                continue;
            }
            match self.load_candidate(&slot, candidate).await {
                Ok(version) => return Outcome::Loaded(version),
                Err(e) => failure = Some(e.to_string()),
            }
        }
        match failure {
            Some(reason) => Outcome::Failed(reason),
            None if serving.is_none() => Outcome::Failed("no version folder to load".into()),
            None => Outcome::Unchanged,
        }
    }

    /// The versions of `name` that could serve, best first.
    fn candidates(&self, name: &str) -> Result<Vec<Candidate>, RepositoryError> {
        let Source::Repository(dir) = &self.source else {
            return Ok(vec![self.single_candidate()]);
        };
        let Some(model) = layout::find_model(dir, name)? else {
            return Ok(Vec::new());
        };
        Ok(model
            .versions
            .iter()
            .rev()
            .map(|&v| repository_candidate(&model, v))
            .collect())
    }

    fn single_candidate(&self) -> Candidate {
        match &self.source {
            Source::Files { arch, checkpoint } => Candidate {
                version: None,
                stamp: FileStamp::of(&[arch, checkpoint]),
                files: Some((arch.clone(), checkpoint.clone())),
                config_file: None,
            },
            _ => Candidate {
                version: Some(0),
                files: None,
                config_file: None,
                stamp: FileStamp::builtin(),
            },
        }
    }

    /// Loads `candidate` off the request path and, when it loads, puts it in
    /// service in place of what `slot` served. A failure is recorded
    /// (index, log, metric) and leaves the served version serving.
    async fn load_candidate(&self, slot: &Arc<ModelSlot>, candidate: Candidate) -> Result<u64, StartError> {
        let name = slot.name.clone();
        let record = |state, reason: &str| VersionRecord {
            state,
            reason: reason.to_string(),
            stamp: candidate.stamp.clone(),
        };
        slot.record(candidate.version, record(ModelState::Loading, "loading"));
        let started = Instant::now();
        let base = self.base.clone();
        let job = candidate.clone();
        let job_name = name.clone();
        let prepared = tokio::task::spawn_blocking(move || prepare_candidate(&base, &job_name, &job))
            .await
            .unwrap_or_else(|_| Err(StartError::Repository("the load panicked".into())));
        let prepared = prepared.and_then(|p| self.check_interface(slot, p));
        let prepared = match prepared {
            Ok(p) if self.registry.is_draining() => {
                drop(p);
                Err(StartError::Repository("the server is shutting down".into()))
            }
            other => other,
        };
        let served = prepared.and_then(|p| start_pool(p, &self.metrics));
        let served = match served {
            Ok(served) => Arc::new(served),
            Err(e) => {
                let reason = e.to_string();
                tracing::error!(model = %name, version = ?candidate.version, reason = %reason,
                    "model version failed to load; the served version (if any) keeps serving");
                self.metrics.model_load_failed(&name);
                slot.record(candidate.version, record(ModelState::Unavailable, &reason));
                return Err(e);
            }
        };
        let version = served.version();
        let load_time = started.elapsed();
        self.metrics.model_load_time(&name, load_time);
        log_loaded(&served, load_time);
        slot.record(Some(version), record(ModelState::Ready, ""));
        let old = slot.swap(Some(Arc::clone(&served)));
        let old_info = old.as_ref().map(|o| o.description().metric_info());
        self.metrics
            .model_served(&served.description().metric_info(), old_info.as_ref());
        if let Some(old) = old {
            let old_version = old.version();
            if old_version != version {
                slot.restate(Some(old_version), ModelState::Unavailable, "unloaded");
            }
            let retirement = old.retirement();
            // Requests that hold it finish on it; it retires after the last.
            drop(old);
            if let Some(retirement) = retirement {
                free_when_retired(retirement, name, old_version);
            }
        }
        Ok(version)
    }

    /// A new version must keep the interface of the one it replaces (rows
    /// of the same width in, the same outputs out): requests already parsed
    /// for the model must fit it.
    fn check_interface(&self, slot: &ModelSlot, p: Prepared) -> Result<Prepared, StartError> {
        let Some(served) = slot.serving() else {
            return Ok(p);
        };
        let (old, new) = (served.description().dims, p.description.dims);
        if (old.input, old.output, old.experts) == (new.input, new.output, new.experts) {
            return Ok(p);
        }
        Err(StartError::Repository(format!(
            "arch does not match the served version {}: input/output/experts {}/{}/{} vs {}/{}/{} \
             (unload the model first to change its interface)",
            served.version(),
            new.input,
            new.output,
            new.experts,
            old.input,
            old.output,
            old.experts
        )))
    }
}

fn repository_candidate(model: &ModelDir, version: u64) -> Candidate {
    let dir = model.version_path(version);
    let (arch, checkpoint, config) = (dir.join(ARCH_FILE), dir.join(CHECKPOINT_FILE), model.config_path());
    Candidate {
        version: Some(version),
        stamp: FileStamp::of(&[&arch, &checkpoint, &config]),
        files: Some((arch, checkpoint)),
        config_file: Some(config),
    }
}

/// Blocking: the model's settings, its files read, packed and warmed up.
fn prepare_candidate(base: &Config, name: &str, c: &Candidate) -> Result<Prepared, StartError> {
    let config = match &c.config_file {
        Some(path) => effective_config(base, path).map_err(StartError::Repository)?,
        None => base.clone(),
    };
    let files = c.files.as_ref().map(|(a, c)| (a.as_path(), c.as_path()));
    let model = crate::model::load_files_or_demo(files)?;
    let version = c.version.unwrap_or(u64::from(model.step));
    prepare(model, &config, name, version)
}

/// Once a retired version's pool ended (its last request answered, its
/// workers finished, its weights freed), gives the freed memory back to the
/// OS and says so.
fn free_when_retired(retirement: Retirement, model: String, version: u64) {
    // Any tokio runtime: the HTTP server's (SIGHUP, polls, HTTP repository
    // calls) or gRPC's (its repository calls).
    tokio::spawn(async move {
        let started = Instant::now();
        retirement.freed().await;
        crate::os::release_freed_memory();
        tracing::info!(
            model,
            version,
            after_ms = started.elapsed().as_millis() as u64,
            "retired model version freed"
        );
    });
}

fn log_loaded(v: &ServedVersion, load_time: Duration) {
    let d = &v.description();
    tracing::info!(
        model = %d.name,
        version = d.version,
        size = d.size,
        layernorm = %d.layernorm,
        weight_precision = %d.weight_precision,
        param_count = d.param_count,
        arch = %d.arch,
        checkpoint = %d.checkpoint,
        backend = d.backend,
        devices = %d.devices,
        load_ms = load_time.as_millis() as u64,
        "model version loaded and serving"
    );
    if d.demo {
        tracing::warn!("no --arch/--checkpoint given: serving the built-in demo model (Nano, deterministic weights)");
    }
}

/// Re-reads the repository every `every` until the registry drains.
pub fn spawn_poller(controller: Arc<Controller>, registry: Arc<Registry>, every: Duration) {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        while !registry.is_draining() {
            ticks.tick().await;
            controller.refresh("poll").await;
        }
    });
}
