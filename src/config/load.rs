//! Layering: the TOML text, then `TOKEN_INJECTOR_*` environment overrides,
//! merged by figment and extracted into the serde mirror ([`Raw`]). Defaults
//! are not a layer here: every key is optional in [`Raw`], and the
//! validator supplies each default where it reads the key.

use figment::Figment;
use figment::providers::{Format, Toml};
use figment::value::{Dict, Map};

use super::Problem;
use super::raw::Raw;

/// Environment variables with this prefix override config keys; `__`
/// separates nesting levels (`TOKEN_INJECTOR_PROXY__LISTEN`).
pub const ENV_PREFIX: &str = "TOKEN_INJECTOR_";
/// Only variables naming a key under these tables are overrides; others
/// under the prefix (`TOKEN_INJECTOR_CONFIG`, `_WORKERS`, `_LOG_FORMAT`, or
/// the `TOKEN_INJECTOR_SERVICE_HOST` that Kubernetes service links inject)
/// are not config and are ignored.
const ENV_SECTIONS: &[&str] = &[
    "proxy", "admin", "tokens", "upstream", "profiles", "routes", "cache",
];

/// The TOML text with the overrides among `env` on top, as the serde
/// mirror. Its problems (bad TOML, wrong types, unknown keys) name their keys.
pub(super) fn layered(
    text: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Raw, Vec<Problem>> {
    let figment = Figment::new()
        .merge(Toml::string(text))
        .merge(EnvOverrides::new(env));
    figment.extract().map_err(figment_problems)
}

fn figment_problems(err: figment::Error) -> Vec<Problem> {
    err.into_iter()
        .map(|e| {
            let mut key = e.path.join(".");
            let message = match &e.kind {
                figment::error::Kind::UnknownField(field, expected) => {
                    // figment's path already ends with the unknown field.
                    if !key.ends_with(field.as_str()) {
                        if !key.is_empty() {
                            key.push('.');
                        }
                        key.push_str(field);
                    }
                    format!("unknown key; expected one of {}", expected.join(", "))
                }
                kind => kind.to_string(),
            };
            if key.is_empty() {
                key = "(config)".into();
            }
            Problem { key, message }
        })
        .collect()
}

/// Environment overrides as a figment provider over an explicit list of
/// variables, so tests never touch the process environment.
struct EnvOverrides(Dict);

impl EnvOverrides {
    fn new(vars: impl IntoIterator<Item = (String, String)>) -> Self {
        let mut dict = Dict::new();
        for (name, value) in vars {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let key = rest.to_ascii_lowercase();
            match key.split_once("__") {
                Some((section, _)) if ENV_SECTIONS.contains(&section) => {}
                _ => continue,
            }
            let path: Vec<&str> = key.split("__").collect();
            if path.iter().any(|k| k.is_empty()) {
                continue;
            }
            // Values parse as figment's Env does: "true", "8", "[\"a\"]".
            let value: figment::value::Value = value.parse().unwrap_or_else(|e| match e {});
            insert_path(&mut dict, &path, value);
        }
        Self(dict)
    }
}

fn insert_path(dict: &mut Dict, path: &[&str], value: figment::value::Value) {
    use figment::value::Value;
    match path {
        [] => {}
        [last] => {
            dict.insert((*last).to_owned(), value);
        }
        [first, rest @ ..] => {
            let entry = dict
                .entry((*first).to_owned())
                .or_insert_with(|| Value::from(Dict::new()));
            if !matches!(entry, Value::Dict(..)) {
                *entry = Value::from(Dict::new());
            }
            if let Value::Dict(_, inner) = entry {
                insert_path(inner, rest, value);
            }
        }
    }
}

impl figment::Provider for EnvOverrides {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named("TOKEN_INJECTOR_ environment variables")
    }
    fn data(&self) -> Result<Map<figment::Profile, Dict>, figment::Error> {
        Ok(figment::Profile::Default.collect(self.0.clone()))
    }
}
