//! Finding the pod network: the lexically first valid CNI configuration in the
//! configured directory, with every plugin it names installed.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("no CNI configuration in {dir}{skipped}")]
    NoConfig { dir: PathBuf, skipped: String },
    #[error("cannot list CNI configuration directory {dir}: {source}")]
    ReadDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CNI configuration {file}: {message}")]
    Invalid { file: PathBuf, message: String },
    #[error("CNI plugin `{plugin}` named by {file} is not in {dirs}")]
    PluginMissing {
        plugin: String,
        file: PathBuf,
        dirs: String,
    },
}

impl CniError {
    /// The CamelCase reason reported with NetworkReady false.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoConfig { .. } | Self::ReadDir { .. } => "NoCNIConfiguration",
            Self::PluginMissing { .. } => "CNIPluginMissing",
            Self::Invalid { .. } => "InvalidCNIConfiguration",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct CniNetwork {
    pub file: PathBuf,
    pub name: String,
    pub plugins: Vec<String>,
    /// The configuration as a list (`{"cniVersion", "name", "plugins": [..]}`), a single
    /// plugin `.conf` wrapped into one: exactly what set-up uses and records.
    pub config: serde_json::Value,
}

const EXTENSIONS: [&str; 3] = ["conflist", "conf", "json"];

pub fn load_network(dir: &Path, plugin_dirs: &[PathBuf]) -> Result<CniNetwork, CniError> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| {
                path.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| EXTENSIONS.contains(&e))
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(source) => {
            return Err(CniError::ReadDir {
                dir: dir.to_path_buf(),
                source,
            });
        }
    };
    files.sort();
    let mut skipped = Vec::new();
    for file in files {
        match parse(&file) {
            Ok(network) => {
                check_plugins(&network, plugin_dirs)?;
                return Ok(network);
            }
            Err(error) => {
                tracing::warn!(%error, "skipping CNI configuration");
                skipped.push(error.to_string());
            }
        }
    }
    let skipped = if skipped.is_empty() {
        String::new()
    } else {
        format!(" (skipped: {})", skipped.join("; "))
    };
    Err(CniError::NoConfig {
        dir: dir.to_path_buf(),
        skipped,
    })
}

fn parse(file: &Path) -> Result<CniNetwork, CniError> {
    let invalid = |message: String| CniError::Invalid {
        file: file.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(file).map_err(|e| invalid(format!("cannot read: {e}")))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| invalid(format!("not valid JSON: {e}")))?;
    let name = value
        .get("name")
        .and_then(|n| n.as_str())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| invalid("has no \"name\"".into()))?;
    let is_list =
        file.extension().is_some_and(|e| e == "conflist") || value.get("plugins").is_some();
    let config = if is_list {
        value.clone()
    } else {
        let version = value
            .get("cniVersion")
            .cloned()
            .unwrap_or_else(|| serde_json::Value::String(String::new()));
        serde_json::json!({ "cniVersion": version, "name": name, "plugins": [value.clone()] })
    };
    let plugin_values: Vec<&serde_json::Value> = config
        .get("plugins")
        .and_then(|p| p.as_array())
        .ok_or_else(|| invalid("a .conflist needs a \"plugins\" array".into()))?
        .iter()
        .collect();
    if plugin_values.is_empty() {
        return Err(invalid("\"plugins\" is empty".into()));
    }
    let plugins = plugin_values
        .iter()
        .enumerate()
        .map(|(i, plugin)| {
            plugin
                .get("type")
                .and_then(|t| t.as_str())
                .filter(|t| !t.is_empty())
                .map(str::to_string)
                .ok_or_else(|| invalid(format!("plugin {i} has no \"type\"")))
        })
        .collect::<Result<_, _>>()?;
    Ok(CniNetwork {
        file: file.to_path_buf(),
        name: name.to_string(),
        plugins,
        config,
    })
}

/// The plugin binary `plugin` in the first of `plugin_dirs` that has it.
pub fn find_plugin(plugin: &str, plugin_dirs: &[PathBuf]) -> Option<PathBuf> {
    // A type such as "../x" would escape the plugin directories.
    if plugin.contains('/') {
        return None;
    }
    plugin_dirs
        .iter()
        .map(|dir| dir.join(plugin))
        .find(|path| path.is_file())
}

pub fn describe_dirs(plugin_dirs: &[PathBuf]) -> String {
    plugin_dirs
        .iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn check_plugins(network: &CniNetwork, plugin_dirs: &[PathBuf]) -> Result<(), CniError> {
    for plugin in &network.plugins {
        if find_plugin(plugin, plugin_dirs).is_none() {
            return Err(CniError::PluginMissing {
                plugin: plugin.clone(),
                file: network.file.clone(),
                dirs: describe_dirs(plugin_dirs),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, PathBuf, Vec<PathBuf>) {
        let root = tempfile::tempdir().expect("tempdir");
        let conf = root.path().join("net.d");
        let bin = root.path().join("bin");
        std::fs::create_dir_all(&conf).expect("mkdir");
        std::fs::create_dir_all(&bin).expect("mkdir");
        for plugin in ["bridge", "portmap"] {
            std::fs::write(bin.join(plugin), "").expect("plugin");
        }
        (root, conf, vec![bin])
    }

    #[test]
    fn empty_dir_is_not_ready_and_says_where_it_looked() {
        let (_root, conf, bins) = setup();
        let error = load_network(&conf, &bins).expect_err("no config");
        assert_eq!(
            error.to_string(),
            format!("no CNI configuration in {}", conf.display())
        );
    }

    #[test]
    fn first_valid_file_wins_and_broken_ones_are_named() {
        let (_root, conf, bins) = setup();
        std::fs::write(conf.join("00-broken.conflist"), "{ not json").expect("write");
        std::fs::write(conf.join("10-net.conflist"), r#"{"cniVersion":"1.0.0","name":"net","plugins":[{"type":"bridge"},{"type":"portmap"}]}"#).expect("write");
        std::fs::write(
            conf.join("20-other.conf"),
            r#"{"cniVersion":"0.4.0","name":"other","type":"bridge"}"#,
        )
        .expect("write");
        let network = load_network(&conf, &bins).expect("ready");
        assert_eq!(network.name, "net");
        assert_eq!(network.plugins, vec!["bridge", "portmap"]);
        assert_eq!(network.config["plugins"][1]["type"], "portmap");

        std::fs::remove_file(conf.join("10-net.conflist")).expect("rm");
        std::fs::remove_file(conf.join("20-other.conf")).expect("rm");
        let message = load_network(&conf, &bins)
            .expect_err("only broken")
            .to_string();
        assert!(
            message.contains("00-broken.conflist") && message.contains("not valid JSON"),
            "{message}"
        );
    }

    #[test]
    fn single_plugin_conf_becomes_a_list() {
        let (_root, conf, bins) = setup();
        std::fs::write(
            conf.join("10-one.conf"),
            r#"{"cniVersion":"0.4.0","name":"one","type":"bridge","bridge":"br9"}"#,
        )
        .expect("write");
        let network = load_network(&conf, &bins).expect("ready");
        assert_eq!(network.config["cniVersion"], "0.4.0");
        assert_eq!(network.config["name"], "one");
        assert_eq!(network.config["plugins"][0]["bridge"], "br9");
    }

    #[test]
    fn missing_plugin_is_named() {
        let (_root, conf, bins) = setup();
        std::fs::write(
            conf.join("10-net.conflist"),
            r#"{"name":"net","plugins":[{"type":"bridge"},{"type":"macvlan"}]}"#,
        )
        .expect("write");
        let message = load_network(&conf, &bins).expect_err("missing").to_string();
        assert!(
            message.contains("`macvlan`") && message.contains("10-net.conflist"),
            "{message}"
        );
    }
}
