//! The part of an image's config JSON the runtime needs to run its containers
//! (user, environment, entrypoint and command, working directory, volumes, stop
//! signal, labels), recorded with the image so that no container start parses JSON.

use trellis_proto::storage::v1::ImageConfig as StoredConfig;

/// What the runtime needs from the image config.
pub fn stored_config(config: &serde_json::Value) -> StoredConfig {
    let inner = config.get("config").cloned().unwrap_or_default();
    let string = |key: &str| {
        inner
            .get(key)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string()
    };
    let strings = |key: &str| -> Vec<String> {
        inner
            .get(key)
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let keys = |key: &str| -> Vec<String> {
        inner
            .get(key)
            .and_then(|v| v.as_object())
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    };
    StoredConfig {
        user: string("User"),
        env: strings("Env"),
        entrypoint: strings("Entrypoint"),
        cmd: strings("Cmd"),
        working_dir: string("WorkingDir"),
        volumes: keys("Volumes"),
        stop_signal: string("StopSignal"),
        labels: inner
            .get("Labels")
            .and_then(|v| v.as_object())
            .map(|o| {
                o.iter()
                    .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                    .collect()
            })
            .unwrap_or_default(),
    }
}
