//! Keys older releases read, so that a node's files still load after an upgrade.
//!
//! An operator upgrades the binaries before (or without) editing `/etc/trellis`: a
//! key that is gone or changed shape must not stop the node. A dropped key is
//! accepted and ignored; a key whose setting now has another form is converted. Both
//! leave a notice (logged as a warning at start) saying what to write instead.

use super::ConfigError;
use super::runtime::{RuntimeHandler, is_handler_name};
use crate::text::excerpt;

/// What becomes of an old key's value.
pub(super) enum Fate {
    /// Nothing reads it any more.
    Ignored,
    /// Its setting now lives under another key, in another form.
    Moved {
        section: &'static str,
        key: &'static str,
        value: toml::Value,
    },
}

/// One key older releases read.
pub(super) struct OldKey {
    pub section: &'static str,
    pub key: &'static str,
    /// Whether the value is a list (so an environment variable or flag is split on
    /// commas, as for current list keys).
    pub is_list: bool,
    /// What to write instead (or why nothing is needed).
    advice: &'static str,
}

const OLD_KEYS: [OldKey; 2] = [
    OldKey {
        section: "runtime",
        key: "default_stop_timeout_seconds",
        is_list: false,
        advice: "nothing read it (StopContainer's timeout is the kubelet's); remove it",
    },
    OldKey {
        section: "runtime",
        key: "runtime_handlers",
        is_list: true,
        advice: "write each handler as a table instead, e.g. `[runtime.handlers.crun]` with `binary = \"/usr/bin/crun\"`",
    },
];

pub(super) fn find(section: &str, key: &str) -> Option<&'static OldKey> {
    OLD_KEYS
        .iter()
        .find(|old| old.section == section && old.key == key)
}

impl OldKey {
    pub fn name(&self) -> String {
        format!("{}.{}", self.section, self.key)
    }

    /// What `value`, set by `source_name`, becomes, and the notice for the operator.
    pub fn rewrite(
        &self,
        value: &toml::Value,
        source_name: &str,
    ) -> Result<(Fate, String), ConfigError> {
        let fate = match self.key {
            "runtime_handlers" => Fate::Moved {
                section: "runtime",
                key: "handlers",
                value: self.handler_table(value, source_name)?,
            },
            _ => Fate::Ignored,
        };
        let what = match &fate {
            Fate::Ignored => "is no longer read and is ignored".to_string(),
            Fate::Moved { section, key, .. } => {
                format!("is deprecated (read as `{section}.{key}`)")
            }
        };
        let notice = format!("{source_name}: `{}` {what}: {}", self.name(), self.advice);
        Ok((fate, notice))
    }

    /// `["name=binary", ...]` as the `runtime.handlers` table. The list replaced the
    /// built-in handlers as a whole, and so does its table; the first of two entries
    /// of one name won, and still does.
    fn handler_table(
        &self,
        value: &toml::Value,
        source_name: &str,
    ) -> Result<toml::Value, ConfigError> {
        let bad = |entry: &str| ConfigError::BadValue {
            source_name: source_name.to_string(),
            key: self.name(),
            expected: "entries `name=binary`, e.g. `crun=/usr/bin/crun`, each name a DNS label"
                .into(),
            value: excerpt(entry),
        };
        let entries = value.as_array().ok_or_else(|| bad(&value.to_string()))?;
        let mut table = toml::Table::new();
        for entry in entries {
            let text = entry.as_str().ok_or_else(|| bad(&entry.to_string()))?;
            let (name, binary) = text.split_once('=').ok_or_else(|| bad(text))?;
            let name = name.trim();
            let handler = RuntimeHandler::new(binary).map_err(|_| bad(text))?;
            if !is_handler_name(name) {
                return Err(bad(text));
            }
            if !table.contains_key(name) {
                let mut fields = toml::Table::new();
                fields.insert("binary".into(), toml::Value::String(handler.binary));
                table.insert(name.to_string(), toml::Value::Table(fields));
            }
        }
        Ok(toml::Value::Table(table))
    }
}
