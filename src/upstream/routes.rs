//! Which upstream serves a generation: the configured upstreams, one [`Upstream`] client (and
//! connection pool) each, and the rule that picks one by the request's `model`.
//!
//! The rule, in order: a model listed in an upstream's `models` goes there as it is; else the
//! upstream with the longest `prefix` the model starts with (and is longer than) gets it without
//! the prefix; else the default upstream gets it as it is; else no upstream serves it and the
//! request is refused before any upstream call ([`UnknownModel`]). The upstreams file is checked
//! at startup (`config.rs`) so that no two routes are ambiguous.

use std::{collections::HashMap, sync::Arc};

use serde_json::{json, Map, Value};

use super::{Upstream, UpstreamError};
use crate::{
    config::NamedUpstream,
    upstream::{client::truncated, LogSafe},
};

/// The upstreams generations stream from, and the routes to them; built once at startup.
pub struct Upstreams {
    upstreams: Vec<Named>,
    /// Model → upstream index, from the `models` lists.
    exact: HashMap<String, usize>,
    /// Prefix → upstream index, longest first, so that the first match is the longest.
    prefixes: Vec<(String, usize)>,
    default: Option<usize>,
}

struct Named {
    name: Arc<str>,
    upstream: Upstream,
    models: Vec<String>,
    prefix: Option<String>,
}

/// Where one generation goes.
pub struct Route {
    pub upstream: Upstream,
    /// The upstream's name, for the generation's log lines.
    pub name: Arc<str>,
    /// The model the upstream is asked for, when it is not the request's (a prefix route
    /// strips its prefix).
    rewritten: Option<String>,
}

impl Route {
    /// The request as the upstream gets it.
    pub fn request(&self, mut request: Map<String, Value>) -> Map<String, Value> {
        if let Some(model) = &self.rewritten {
            request.insert("model".into(), Value::from(model.as_str()));
        }
        request
    }
}

/// No route takes the request's model.
#[derive(Debug, thiserror::Error)]
#[error("no configured upstream serves the model `{0}`")]
pub struct UnknownModel(String);

/// Failures of one upstream while building the clients (an unreadable CA file, …).
#[derive(Debug, thiserror::Error)]
#[error("upstream `{name}`: {error}")]
pub struct InvalidUpstream {
    pub name: String,
    pub error: UpstreamError,
}

/// Today's single upstream (`--upstream-url` and friends, or the embedded mock) serves every
/// model as it is.
impl From<Upstream> for Upstreams {
    fn from(upstream: Upstream) -> Self {
        Self {
            upstreams: vec![Named {
                name: Arc::from("default"),
                upstream,
                models: Vec::new(),
                prefix: None,
            }],
            exact: HashMap::new(),
            prefixes: Vec::new(),
            default: Some(0),
        }
    }
}

impl Upstreams {
    /// One client per upstream of the (already checked) upstreams file.
    pub fn new(named: Vec<NamedUpstream>) -> Result<Self, InvalidUpstream> {
        let mut upstreams = Self {
            upstreams: Vec::with_capacity(named.len()),
            exact: HashMap::new(),
            prefixes: Vec::new(),
            default: None,
        };
        for (index, entry) in named.into_iter().enumerate() {
            let base_url = entry.settings.url.as_deref().unwrap_or_default();
            let upstream =
                Upstream::new(&entry.settings, base_url).map_err(|error| InvalidUpstream {
                    name: entry.name.clone(),
                    error,
                })?;
            for model in &entry.models {
                upstreams.exact.entry(model.clone()).or_insert(index);
            }
            if let Some(prefix) = &entry.prefix {
                upstreams.prefixes.push((prefix.clone(), index));
            }
            if entry.default {
                upstreams.default.get_or_insert(index);
            }
            upstreams.upstreams.push(Named {
                name: Arc::from(entry.name),
                upstream,
                models: entry.models,
                prefix: entry.prefix,
            });
        }
        upstreams
            .prefixes
            .sort_by(|(a, _), (b, _)| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        Ok(upstreams)
    }

    /// The upstream that serves `model`, by the rule in the module doc.
    pub fn route(&self, model: &str) -> Result<Route, UnknownModel> {
        let (index, rewritten) = self
            .find(model)
            .ok_or_else(|| UnknownModel(truncated(model)))?;
        let named = &self.upstreams[index];
        Ok(Route {
            upstream: named.upstream.clone(),
            name: named.name.clone(),
            rewritten: rewritten.map(str::to_owned),
        })
    }

    /// The upstream index for `model`, and the model it is asked for when that differs.
    fn find<'m>(&self, model: &'m str) -> Option<(usize, Option<&'m str>)> {
        if let Some(&index) = self.exact.get(model) {
            return Some((index, None));
        }
        let by_prefix = self.prefixes.iter().find_map(|(prefix, index)| {
            model
                .strip_prefix(prefix.as_str())
                .filter(|rest| !rest.is_empty())
                .map(|rest| (*index, Some(rest)))
        });
        by_prefix.or(self.default.map(|index| (index, None)))
    }

    /// Every model a client can ask for, as OpenAI's list: each upstream's `models`, even when
    /// its provider is down, and the provider's own list of the upstreams that route by
    /// prefix (listed with the prefix) or by default, asked all at once, each within the
    /// first-token deadline. Only names that route to the upstream that lists them are kept.
    /// A provider that fails is left out (and logged); when every one asked failed and nothing
    /// else is listed, the first failure is the answer.
    pub async fn models(&self) -> Result<Value, UpstreamError> {
        let asked = futures_util::future::join_all(self.upstreams.iter().enumerate().map(
            |(index, named)| async move {
                // Only these take models beyond their list; the others' lists are the config's.
                let routes_unlisted = named.prefix.is_some() || self.default == Some(index);
                if routes_unlisted {
                    Some(named.upstream.models().await)
                } else {
                    None
                }
            },
        ))
        .await;
        let mut data = Vec::new();
        let mut listed = std::collections::HashSet::new();
        let mut first_error = None;
        for (index, (named, answer)) in self.upstreams.iter().zip(asked).enumerate() {
            for model in &named.models {
                if listed.insert(model.clone()) {
                    data.push(json!({
                        "id": model, "object": "model", "created": 0, "owned_by": &*named.name,
                    }));
                }
            }
            let provided = match answer {
                None => continue,
                Some(Ok(list)) => list,
                Some(Err(error)) => {
                    tracing::warn!(
                        upstream = %named.name,
                        error = %LogSafe(&error.to_string()),
                        "the upstream's model list is left out of /v1/models"
                    );
                    first_error.get_or_insert(error);
                    continue;
                }
            };
            let entries = match provided {
                Value::Object(mut list) => match list.remove("data") {
                    Some(Value::Array(entries)) => entries,
                    _ => Vec::new(),
                },
                _ => Vec::new(),
            };
            for mut entry in entries {
                let Some(id) = entry.get("id").and_then(Value::as_str) else {
                    continue;
                };
                let id = match &named.prefix {
                    Some(prefix) => format!("{prefix}{id}"),
                    None => id.to_owned(),
                };
                if self.find(&id).map(|(to, _)| to) == Some(index) && listed.insert(id.clone()) {
                    entry["id"] = Value::from(id);
                    data.push(entry);
                }
            }
        }
        match first_error {
            Some(error) if data.is_empty() => Err(error),
            _ => Ok(json!({"object": "list", "data": data})),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// Upstreams that are never called: routing needs only their names and routes.
    fn upstreams(routes: &[(&str, &[&str], Option<&str>, bool)]) -> Upstreams {
        let global = Config::defaults().upstream;
        let named = routes
            .iter()
            .map(|(name, models, prefix, default)| NamedUpstream {
                name: (*name).to_owned(),
                settings: crate::config::UpstreamConfig {
                    url: Some("http://127.0.0.1:1/v1".into()),
                    ..global.clone()
                },
                models: models.iter().map(|model| (*model).to_owned()).collect(),
                prefix: prefix.map(str::to_owned),
                default: *default,
            })
            .collect();
        Upstreams::new(named).unwrap()
    }

    /// (upstream name, model sent) for `model`.
    fn route(upstreams: &Upstreams, model: &str) -> Option<(String, String)> {
        let route = upstreams.route(model).ok()?;
        let request = route.request(Map::from_iter([("model".into(), Value::from(model))]));
        Some((
            route.name.to_string(),
            request["model"].as_str()?.to_owned(),
        ))
    }

    fn to(name: &str, model: &str) -> Option<(String, String)> {
        Some((name.to_owned(), model.to_owned()))
    }

    #[test]
    fn exact_names_then_longest_prefix_then_default() {
        let upstreams = upstreams(&[
            ("openai", &["gpt-4o", "anthropic/pinned"], None, true),
            (
                "anthropic",
                &["claude-sonnet-4-5"],
                Some("anthropic/"),
                false,
            ),
            ("anthropic-eu", &[], Some("anthropic/eu/"), false),
        ]);
        // Exact names are sent as they are, and win over a prefix.
        assert_eq!(route(&upstreams, "gpt-4o"), to("openai", "gpt-4o"));
        assert_eq!(
            route(&upstreams, "claude-sonnet-4-5"),
            to("anthropic", "claude-sonnet-4-5")
        );
        assert_eq!(
            route(&upstreams, "anthropic/pinned"),
            to("openai", "anthropic/pinned")
        );
        // The longest prefix wins, and is stripped.
        assert_eq!(
            route(&upstreams, "anthropic/claude-x"),
            to("anthropic", "claude-x")
        );
        assert_eq!(
            route(&upstreams, "anthropic/eu/claude-x"),
            to("anthropic-eu", "claude-x")
        );
        // A prefix alone names no model: the default takes it, unchanged.
        assert_eq!(route(&upstreams, "anthropic/"), to("openai", "anthropic/"));
        assert_eq!(route(&upstreams, "o3"), to("openai", "o3"));
    }

    #[test]
    fn without_a_default_an_unrouted_model_is_refused() {
        let upstreams = upstreams(&[
            ("openai", &["gpt-4o"], None, false),
            ("anthropic", &[], Some("anthropic/"), false),
        ]);
        assert_eq!(
            route(&upstreams, "anthropic/claude-x"),
            to("anthropic", "claude-x")
        );
        let refused = upstreams.route("gpt-5").err().unwrap();
        assert_eq!(
            refused.to_string(),
            "no configured upstream serves the model `gpt-5`"
        );
        // A name is quoted back cut, as provider messages are.
        let quoted = upstreams
            .route(&"m".repeat(10_000))
            .err()
            .unwrap()
            .to_string();
        assert!(quoted.len() < 1_000, "{quoted}");
    }

    #[test]
    fn one_upstream_from_the_flags_serves_every_model_as_it_is() {
        let global = Config::defaults().upstream;
        let single = Upstreams::from(Upstream::new(&global, "http://127.0.0.1:1/v1").unwrap());
        assert_eq!(
            route(&single, "anything/at-all"),
            to("default", "anything/at-all")
        );
    }
}
