//! A model's own settings: the optional `DIR/<model>/config.toml`.
//!
//! Owns: which settings a model may set for itself (`[model]` `layernorm`
//! and `weight_precision`; every `[batching]` and `[workers]` setting) and
//! turning the file into that model's effective [`Config`]: the server's
//! configuration with the file on top, validated as a whole, so an invalid
//! value is refused with the setting named, as at start-up. Must not touch:
//! what the settings do.

use std::path::Path;

use crate::config::Config;

/// Largest model `config.toml` read (real ones are a few hundred bytes).
const MAX_MODEL_CONFIG: u64 = 64 * 1024;

/// The `[model]` keys a model's file may set; the rest of `[model]` is the
/// server's (the repository, the name, the control mode).
const MODEL_KEYS: [&str; 2] = ["layernorm", "weight_precision"];
/// Sections a model's file may contain (all of their keys).
const OPEN_SECTIONS: [&str; 2] = ["batching", "workers"];

/// `base` with the model's `config.toml` at `path` on top (just `base` when
/// there is no such file). The error names the file and the setting.
pub fn effective_config(base: &Config, path: &Path) -> Result<Config, String> {
    if !path.exists() {
        return Ok(base.clone());
    }
    let named = |message: String| format!("{}: {message}", path.display());
    let bytes = crate::model::files::read_regular_file(path, MAX_MODEL_CONFIG).map_err(|e| named(e.to_string()))?;
    let text = String::from_utf8(bytes).map_err(|_| named("not valid UTF-8".into()))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| named(e.message().trim().to_string()))?;
    check_keys(&table).map_err(named)?;
    base.layered(&table).map_err(|e| named(e.to_string()))
}

/// Refuses sections and keys a model may not set, naming them.
fn check_keys(table: &toml::Table) -> Result<(), String> {
    for (section, value) in table {
        let toml::Value::Table(keys) = value else {
            return Err(format!("`{section}` must be a [section]"));
        };
        if OPEN_SECTIONS.contains(&section.as_str()) {
            continue;
        }
        if section != "model" {
            return Err(format!(
                "section [{section}] cannot be set per model (allowed: [model] layernorm / weight_precision, [batching], [workers])"
            ));
        }
        if let Some(key) = keys.keys().find(|k| !MODEL_KEYS.contains(&k.as_str())) {
            return Err(format!(
                "setting `model.{key}` cannot be set per model (allowed: model.layernorm, model.weight_precision)"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{LayerNormMode, WeightPrecision};

    fn with_file(text: &str) -> Result<Config, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        effective_config(&Config::default(), &path)
    }

    #[test]
    fn a_model_file_layers_its_settings_and_is_validated_naming_the_setting() {
        let c = with_file(
            "[model]\nlayernorm = \"stored\"\nweight_precision = \"f16\"\n[workers]\ncount = 1\n[batching]\nmax_batch_rows = 8\n",
        )
        .unwrap();
        assert_eq!(c.model.layernorm, LayerNormMode::Stored);
        assert_eq!(c.model.weight_precision, WeightPrecision::F16);
        assert_eq!((c.workers.count, c.batching.max_batch_rows), (1, 8));
        assert_eq!(c.server, Config::default().server);

        let e = with_file("[batching]\nmax_batch_rows = 0\n").unwrap_err();
        assert!(
            e.contains("config.toml") && e.contains("batching.max_batch_rows"),
            "{e}"
        );
        let e = with_file("[workers]\ncount = \"many\"\n").unwrap_err();
        assert!(e.contains("workers.count"), "{e}");
        let e = with_file("[batching]\nmax_rows = 3\n").unwrap_err();
        assert!(e.contains("max_rows"), "{e}");
        let e = with_file("[server]\nbind = \"0.0.0.0:1\"\n").unwrap_err();
        assert!(e.contains("[server]"), "{e}");
        let e = with_file("[model]\nname = \"other\"\n").unwrap_err();
        assert!(e.contains("model.name"), "{e}");
        let e = with_file("not toml").unwrap_err();
        assert!(e.contains("config.toml"), "{e}");
        let none = effective_config(&Config::default(), Path::new("/nonexistent/config.toml")).unwrap();
        assert_eq!(none, Config::default());
    }
}
