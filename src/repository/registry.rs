//! Which version of each model serves: the one switch between versions.
//!
//! Owns: the known models ([`ModelSlot`], one per model folder or configured
//! model), the served version of each behind a lock held only to copy or
//! replace one pointer ([`ModelSlot::swap`]: new requests go to the new
//! version from that instant; requests that already hold the old one finish
//! on it), what is remembered of each version tried (for the index), the
//! default model of `/infer`, readiness over all models, and the
//! server-wide draining flag (which moves every served version to
//! `Draining`; each version's own state is its `VersionState`).
//! Resolving a request's target ([`Registry::resolve`]) is the only thing on
//! the request path here: a map lookup and an `Arc` clone under read locks.
//! Must not touch: loading (the controller builds versions off the request
//! path and hands them in), compute, the engine facade above it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::{Mutex, RwLock};

use super::index::{IndexEntry, VersionRecord};
use crate::error::EngineError;
use crate::labels::ModelState;
use crate::served::{ModelTarget, ServedVersion};

/// Every model the engine knows, and the version each serves.
pub struct Registry {
    models: RwLock<BTreeMap<String, Arc<ModelSlot>>>,
    /// `model.name`: the model `/infer` goes to when it exists.
    configured_default: String,
    draining: AtomicBool,
}

/// One model: its served version (if any) and its versions' records.
pub struct ModelSlot {
    pub name: String,
    serving: RwLock<Option<Arc<ServedVersion>>>,
    book: Mutex<Book>,
}

#[derive(Default)]
struct Book {
    /// Every version tried, by number (`None`: a load of the `--arch /
    /// --checkpoint` files that failed before its step was read).
    versions: BTreeMap<Option<u64>, VersionRecord>,
    /// Why nothing serves, when nothing does and no version says.
    reason: Option<String>,
}

impl Registry {
    pub fn new(configured_default: &str) -> Registry {
        Registry {
            models: RwLock::new(BTreeMap::new()),
            configured_default: configured_default.to_string(),
            draining: AtomicBool::new(false),
        }
    }

    /// The version that serves `target` now, ready to take a request.
    pub fn resolve(&self, target: &ModelTarget) -> Result<Arc<ServedVersion>, EngineError> {
        let slot = {
            let models = self.models.read();
            let name = match target.name {
                Some(name) => name,
                None => default_of(&models, &self.configured_default).ok_or_else(|| EngineError::UnknownModel {
                    model: self.configured_default.clone(),
                    version: None,
                })?,
            };
            models.get(name).cloned().ok_or_else(|| EngineError::UnknownModel {
                model: name.to_string(),
                version: target.version,
            })?
        };
        let serving = slot.serving();
        match (serving, target.version) {
            (Some(v), None) => ready(v),
            (Some(v), Some(asked)) if v.version() == asked => ready(v),
            (serving, asked) => Err(slot.not_serving(serving.as_deref(), asked)),
        }
    }

    /// The default model's name (`model.name` when known, else the only model).
    pub fn default_model(&self) -> Option<String> {
        default_of(&self.models.read(), &self.configured_default).map(str::to_string)
    }

    pub fn slot(&self, name: &str) -> Option<Arc<ModelSlot>> {
        self.models.read().get(name).cloned()
    }

    /// The slot of `name`, created (serving nothing) if new.
    pub fn ensure_slot(&self, name: &str) -> Arc<ModelSlot> {
        let mut models = self.models.write();
        Arc::clone(models.entry(name.to_string()).or_insert_with(|| {
            Arc::new(ModelSlot {
                name: name.to_string(),
                serving: RwLock::new(None),
                book: Mutex::new(Book::default()),
            })
        }))
    }

    /// Forgets model `name` (its folder is gone); returns its slot.
    pub fn remove_slot(&self, name: &str) -> Option<Arc<ModelSlot>> {
        self.models.write().remove(name)
    }

    /// Names of every known model.
    pub fn names(&self) -> Vec<String> {
        self.models.read().keys().cloned().collect()
    }

    /// Every served version, by model name.
    pub fn served(&self) -> Vec<Arc<ServedVersion>> {
        let slots: Vec<Arc<ModelSlot>> = self.models.read().values().cloned().collect();
        slots.iter().filter_map(|s| s.serving()).collect()
    }

    /// Triton's repository index; with `ready_only`, the `READY` rows only.
    pub fn index(&self, ready_only: bool) -> Vec<IndexEntry> {
        let slots: Vec<Arc<ModelSlot>> = self.models.read().values().cloned().collect();
        slots
            .iter()
            .flat_map(|s| s.entries())
            .filter(|e| !ready_only || e.is_ready())
            .collect()
    }

    /// Ready to serve: not draining, at least one model served, and every
    /// served version's workers serving.
    pub fn is_ready(&self) -> bool {
        let served = self.served();
        !self.is_draining() && !served.is_empty() && served.iter().all(|v| v.readiness().is_ready())
    }

    /// Readiness's words for `/readyz`: ready, starting, draining, ...
    pub fn state(&self) -> crate::readiness::State {
        use crate::readiness::State;
        if self.is_draining() {
            return State::Draining;
        }
        let served = self.served();
        if served.is_empty() {
            return State::Starting;
        }
        served
            .iter()
            .map(|v| v.readiness().state())
            .find(|s| *s != State::Ready)
            .unwrap_or(State::Ready)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Shutting down: every served version stops taking work, nothing new loads.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
        for v in self.served() {
            v.readiness().start_draining();
        }
    }
}

/// `configured` when it is a known model, else the only model, else none.
fn default_of<'a>(models: &'a BTreeMap<String, Arc<ModelSlot>>, configured: &'a str) -> Option<&'a str> {
    if models.contains_key(configured) {
        return Some(configured);
    }
    match models.len() {
        1 => models.keys().next().map(String::as_str),
        _ => None,
    }
}

fn ready(v: Arc<ServedVersion>) -> Result<Arc<ServedVersion>, EngineError> {
    v.readiness().check()?;
    Ok(v)
}

impl ModelSlot {
    /// The served version (a pointer copy under a read lock).
    pub fn serving(&self) -> Option<Arc<ServedVersion>> {
        self.serving.read().clone()
    }

    /// Puts `next` in service (or nothing) in one step; returns what served.
    /// The caller drops the old version outside the lock; it retires once
    /// its last request is answered.
    pub fn swap(&self, next: Option<Arc<ServedVersion>>) -> Option<Arc<ServedVersion>> {
        std::mem::replace(&mut *self.serving.write(), next)
    }

    /// Remembers version `version`'s state (and why).
    pub fn record(&self, version: Option<u64>, record: VersionRecord) {
        let mut book = self.book.lock();
        if record.state == ModelState::Ready {
            book.reason = None;
            // A version that serves replaces the failure of its unnumbered load.
            book.versions.remove(&None);
        }
        book.versions.insert(version, record);
    }

    /// The record of `version`, if it was tried.
    pub fn record_of(&self, version: Option<u64>) -> Option<VersionRecord> {
        self.book.lock().versions.get(&version).cloned()
    }

    /// Marks every record in `from` as `to` with `reason` (e.g. READY ->
    /// UNAVAILABLE "unloaded").
    pub fn restate(&self, version: Option<u64>, to: ModelState, reason: &str) {
        if let Some(r) = self.book.lock().versions.get_mut(&version) {
            r.state = to;
            r.reason = reason.to_string();
        }
    }

    /// Forgets the records of numbered versions not in `present` (their
    /// folders are gone), except `keep` (the one serving).
    pub fn forget_missing(&self, present: &[u64], keep: Option<u64>) {
        self.book
            .lock()
            .versions
            .retain(|v, _| v.is_none_or(|v| present.contains(&v) || Some(v) == keep));
    }

    /// Why nothing serves (shown when no version record says).
    pub fn set_reason(&self, reason: &str) {
        self.book.lock().reason = Some(reason.to_string());
    }

    /// This model's index rows: one per version tried, or one without a
    /// version when none was.
    fn entries(&self) -> Vec<IndexEntry> {
        let book = self.book.lock();
        let mut rows: Vec<IndexEntry> = book
            .versions
            .iter()
            .map(|(v, r)| IndexEntry {
                name: self.name.clone(),
                version: v.map(|v| v.to_string()).unwrap_or_default(),
                state: r.state,
                reason: r.reason.clone(),
            })
            .collect();
        if rows.is_empty() {
            rows.push(IndexEntry {
                name: self.name.clone(),
                version: String::new(),
                state: ModelState::Unavailable,
                reason: book.reason.clone().unwrap_or_else(|| "unloaded".into()),
            });
        }
        rows
    }

    /// The error for a request this model cannot serve as asked.
    fn not_serving(&self, serving: Option<&ServedVersion>, asked: Option<u64>) -> EngineError {
        let book = self.book.lock();
        let unknown = || EngineError::UnknownModel {
            model: self.name.clone(),
            version: asked,
        };
        let reason = match (asked, serving) {
            (Some(v), _) => match book.versions.get(&Some(v)) {
                None => return unknown(),
                Some(r) => match serving {
                    Some(s) => format!("version {v} is {} (version {} serves)", r.state, s.version()),
                    None => format!("version {v} is {}: {}", r.state, r.reason),
                },
            },
            (None, _) => {
                let last = book.versions.iter().next_back().map(|(_, r)| r.reason.clone());
                let reason = book.reason.clone().or(last).unwrap_or_else(|| "unloaded".into());
                format!("no version is loaded ({reason})")
            }
        };
        EngineError::ModelNotReady {
            model: self.name.clone(),
            reason,
        }
    }
}
