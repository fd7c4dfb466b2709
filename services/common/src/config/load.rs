//! How the configuration is put together from its layers, and where each value came
//! from.
//!
//! Every value a layer sets is checked on its own, as the one key set in an otherwise
//! empty configuration: a value that does not parse (a wrong type, a socket mode, a
//! mirror, a runtime handler) is reported with its key and the layer that set it,
//! whichever layer that is. Sections and keys are the `Config` structs' own fields, so
//! the known keys are read off the built-in defaults.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::legacy::{self, Fate};
use super::{CONFIG_FILE_ENV, Config, ConfigError, DEFAULT_CONFIG_FILE, ENV_PREFIX};
use crate::text::excerpt;

/// How the configuration is to be found and overridden.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    /// An explicit file (from `--config` or `TRELLIS_CONFIG`); it must exist.
    pub file: Option<PathBuf>,
    /// `section.key=value` overrides from flags.
    pub overrides: Vec<String>,
}

impl ConfigSource {
    pub fn load(&self) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        self.load_with_env(&env)
    }

    pub fn load_with_env(&self, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let defaults = toml::Value::try_from(Config::default())
            .map_err(|e| ConfigError::Merge(e.to_string()))?;
        let mut layers = Layers {
            merged: defaults.clone(),
            defaults: &defaults,
            provenance: Provenance::default(),
            notices: Vec::new(),
        };

        let explicit = self.file.clone().or_else(|| {
            env.iter()
                .find(|(k, _)| k == CONFIG_FILE_ENV)
                .map(|(_, v)| PathBuf::from(v))
        });
        let file = explicit
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_FILE));
        if explicit.is_some() || file.exists() {
            layers.merge_file(&file)?;
        }
        for dropin in dropins(&file)? {
            layers.merge_file(&dropin)?;
        }

        for (name, value) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            // Only variables naming one of our sections are configuration; a typo in
            // a key of a known section is an error, other TRELLIS_ variables are not ours.
            let names_a_section = rest
                .split_once('_')
                .is_some_and(|(section, _)| defaults.get(section.to_ascii_lowercase()).is_some());
            if name == CONFIG_FILE_ENV || !names_a_section {
                continue;
            }
            let source_name = format!("environment variable {name}");
            let key = layers
                .env_key(rest)
                .ok_or_else(|| layers.unknown_key(&source_name, &rest.to_ascii_lowercase()))?;
            layers.apply_override(&key, value, &source_name)?;
        }
        for flag in &self.overrides {
            let (key, value) = flag
                .split_once('=')
                .ok_or_else(|| ConfigError::BadFlag(format!("--set {flag}")))?;
            layers.apply_override(key.trim(), value, &format!("flag --set {flag}"))?;
        }

        let Layers {
            merged,
            provenance,
            notices,
            ..
        } = layers;
        let mut config: Config = merged
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Merge(e.to_string()))?;
        super::validate(&config, &provenance)?;
        config.notices = notices;
        Ok(config)
    }
}

fn dropins(file: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let dir = file
        .parent()
        .unwrap_or_else(|| Path::new("/"))
        .join("trellis.d");
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(ConfigError::ReadDir { path: dir, source }),
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|source| ConfigError::ReadDir {
                path: dir.clone(),
                source,
            })?
            .path();
        if path.extension().is_some_and(|ext| ext == "toml") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Which layer set each key, so that a bad value can be traced to its origin.
#[derive(Debug, Default)]
pub(in crate::config) struct Provenance(BTreeMap<String, String>);

impl Provenance {
    /// The layer that set `key`, or one of the tables holding it.
    pub(in crate::config) fn source_of(&self, key: &str) -> String {
        let mut key = key;
        loop {
            if let Some(source) = self.0.get(key) {
                return source.clone();
            }
            match key.rsplit_once('.') {
                Some((parent, _)) => key = parent,
                None => return "built-in default".into(),
            }
        }
    }

    /// `key`, set to `value`, is not what it should be.
    pub(in crate::config) fn bad_value(
        &self,
        key: &str,
        expected: &str,
        value: &str,
    ) -> ConfigError {
        ConfigError::BadValue {
            source_name: self.source_of(key),
            key: key.to_string(),
            expected: expected.to_string(),
            value: excerpt(value),
        }
    }

    fn record(&mut self, key: String, source_name: &str) {
        // A whole table set anew replaces what set its entries before.
        let entries = format!("{key}.");
        self.0.retain(|known, _| !known.starts_with(&entries));
        self.0.insert(key, source_name.to_string());
    }
}

/// The layers merged so far.
struct Layers<'a> {
    defaults: &'a toml::Value,
    merged: toml::Value,
    provenance: Provenance,
    notices: Vec<String>,
}

impl Layers<'_> {
    fn merge_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let file_error = |e: toml::de::Error| ConfigError::File {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        };
        // Syntax only: each value is then checked on its own, for a message that names
        // its key (serde's, for the whole file, shows a line but not which section).
        let table: toml::Table = toml::from_str(&text).map_err(file_error)?;
        let source_name = format!("configuration file {}", path.display());
        for (section, values) in table {
            match values {
                toml::Value::Table(values) => {
                    for (key, value) in values {
                        self.set(&section, &key, value, &source_name)?;
                    }
                }
                // Not a section: the check says what is wrong with it.
                other => check(&[&section], &other, &source_name)?,
            }
        }
        Ok(())
    }

    /// Sets `section.key`, checked, from `source_name`. A table for a key whose
    /// default is a table (the runtime handlers) is merged entry by entry, as
    /// drop-ins add handlers to those of the file.
    fn set(
        &mut self,
        section: &str,
        key: &str,
        value: toml::Value,
        source_name: &str,
    ) -> Result<(), ConfigError> {
        if let Some(old) = legacy::find(section, key) {
            let (fate, notice) = old.rewrite(&value, source_name)?;
            self.notices.push(notice);
            return match fate {
                Fate::Ignored => Ok(()),
                Fate::Moved {
                    section,
                    key,
                    value,
                } => self.set_whole(&[section, key], value, source_name),
            };
        }
        let is_map = self
            .defaults
            .get(section)
            .and_then(|s| s.get(key))
            .is_some_and(toml::Value::is_table);
        match value {
            toml::Value::Table(entries) if is_map => {
                for (name, entry) in entries {
                    self.set_whole(&[section, key, &name], entry, source_name)?;
                }
                Ok(())
            }
            value => self.set_whole(&[section, key], value, source_name),
        }
    }

    fn set_whole(
        &mut self,
        path: &[&str],
        value: toml::Value,
        source_name: &str,
    ) -> Result<(), ConfigError> {
        check(path, &value, source_name)?;
        set_path(&mut self.merged, path, value);
        self.provenance.record(path.join("."), source_name);
        Ok(())
    }

    /// `GATEWAY_BACKEND_RETRY_MS` → `gateway.backend_retry_ms`: section names hold no `_`.
    fn env_key(&self, rest: &str) -> Option<String> {
        let lower = rest.to_ascii_lowercase();
        let (section, key) = lower.split_once('_')?;
        let known = self.defaults.get(section)?.get(key).is_some();
        (known || legacy::find(section, key).is_some()).then(|| format!("{section}.{key}"))
    }

    fn known_keys(&self) -> Vec<String> {
        known_keys(self.defaults)
    }

    fn unknown_key(&self, source_name: &str, key: &str) -> ConfigError {
        ConfigError::UnknownKey {
            source_name: source_name.to_string(),
            key: excerpt(key),
            known: self.known_keys().join(", "),
        }
    }

    /// A value from an environment variable or a flag, given as text: read as the
    /// key's default is (lists comma-separated, tables as TOML inline tables).
    fn apply_override(
        &mut self,
        key: &str,
        raw: &str,
        source_name: &str,
    ) -> Result<(), ConfigError> {
        let (section, field) = key
            .split_once('.')
            .ok_or_else(|| self.unknown_key(source_name, key))?;
        let bad = |expected: &str| ConfigError::BadValue {
            source_name: source_name.to_string(),
            key: key.to_string(),
            expected: expected.to_string(),
            value: excerpt(raw),
        };
        let shape = match legacy::find(section, field) {
            Some(old) if old.is_list => toml::Value::Array(Vec::new()),
            Some(_) => toml::Value::String(String::new()),
            None => self
                .defaults
                .get(section)
                .and_then(|s| s.get(field))
                .cloned()
                .ok_or_else(|| self.unknown_key(source_name, key))?,
        };
        let value = match shape {
            toml::Value::String(_) => toml::Value::String(raw.to_string()),
            toml::Value::Integer(_) => toml::Value::Integer(
                raw.trim()
                    .parse::<u64>()
                    .ok()
                    .and_then(|v| i64::try_from(v).ok())
                    .ok_or_else(|| bad("a non-negative integer"))?,
            ),
            toml::Value::Boolean(_) => {
                toml::Value::Boolean(raw.trim().parse().map_err(|_| bad("true or false"))?)
            }
            toml::Value::Array(_) => toml::Value::Array(
                raw.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| toml::Value::String(s.into()))
                    .collect(),
            ),
            toml::Value::Table(_) => toml::from_str::<toml::Table>(&format!("value = {raw}"))
                .ok()
                .and_then(|mut parsed| parsed.remove("value"))
                .filter(toml::Value::is_table)
                .ok_or_else(|| {
                    bad("a TOML inline table, e.g. `{ crun = { binary = \"/usr/bin/crun\" } }`")
                })?,
            _ => return Err(bad("a value that can be given as text")),
        };
        self.set(section, field, value, source_name)
    }
}

pub(super) fn known_keys(defaults: &toml::Value) -> Vec<String> {
    let mut keys = Vec::new();
    if let Some(sections) = defaults.as_table() {
        for (section, values) in sections {
            if let Some(values) = values.as_table() {
                keys.extend(values.keys().map(|key| format!("{section}.{key}")));
            }
        }
    }
    keys
}

/// `value` at `path` on its own, as the configuration reads it.
fn check(path: &[&str], value: &toml::Value, source_name: &str) -> Result<(), ConfigError> {
    let mut probe = toml::Value::Table(toml::Table::new());
    set_path(&mut probe, path, value.clone());
    match probe.try_into::<Config>() {
        Ok(_) => Ok(()),
        Err(error) => Err(ConfigError::Invalid {
            source_name: source_name.to_string(),
            key: excerpt(&path.join(".")),
            message: error.message().to_string(),
        }),
    }
}

/// Sets `value` at `path`, making the tables on the way.
fn set_path(root: &mut toml::Value, path: &[&str], value: toml::Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut table = root;
    for parent in parents {
        let Some(map) = table.as_table_mut() else {
            return;
        };
        table = map
            .entry(parent.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    }
    if let Some(map) = table.as_table_mut() {
        map.insert(last.to_string(), value);
    }
}
