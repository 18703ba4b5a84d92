//! The token side of a config: one [`Store`] and one background task per
//! profile in use. Built beside what runs ([`Profiles::prepare`], which can
//! fail and changes nothing), then swapped in ([`Profiles::commit`]).
//! Profiles whose settings did not change keep their store, so a reload
//! keeps their tokens.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use tokio::task::JoinHandle;

use crate::cache;
use crate::config::{self, CacheMode, Config};
use crate::metrics::{CacheMetrics, TokenMetrics};

use crate::token::{Client, Policy, Store, client};

/// Why a config's token side could not be built.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Client(#[from] client::BuildError),
    #[error("tokens: {0}")]
    Policy(String),
    #[error(transparent)]
    Cache(#[from] cache::BuildError),
    #[error("profiles.{0}.dpop_key_file: {1}")]
    Dpop(String, crate::keys::KeyError),
}

/// What a profile's credential depends on: equal settings keep the store.
/// A shared profile depends on `[cache]` too.
#[derive(Debug, Clone, PartialEq)]
enum Settings {
    Grant(Box<(config::Profile, config::Tokens, Option<config::Cache>)>),
    Static(config::Static),
}

/// How a (re)started profile gets its credential.
enum Obtain {
    Grant(Arc<Client>),
    Shared(Arc<cache::Shared<Client>>),
    Static(PathBuf),
}

struct Running {
    settings: Settings,
    store: Arc<Store>,
    task: JoinHandle<()>,
}

/// The token side of a config, built and not yet running.
pub struct Prepared {
    policy: Policy,
    /// Profiles to (re)start.
    start: Vec<(String, Settings, Arc<Store>, Obtain)>,
    /// The store of every profile in use, kept or new, for the routes.
    stores: BTreeMap<String, Arc<Store>>,
    /// The Redis connection of `[cache]`, kept while `[cache]` is unchanged.
    backend: Option<(config::Cache, Arc<cache::Backend>)>,
}

impl Prepared {
    pub fn stores(&self) -> &BTreeMap<String, Arc<Store>> {
        &self.stores
    }
}

/// The profiles running now.
#[derive(Default)]
pub struct Profiles {
    running: HashMap<String, Running>,
    backend: Option<(config::Cache, Arc<cache::Backend>)>,
}

impl Profiles {
    /// Builds the token side of `config` beside what runs, reusing the
    /// stores of unchanged profiles.
    pub fn prepare(
        &self,
        config: &Config,
        metrics: &TokenMetrics,
        cache_metrics: &CacheMetrics,
    ) -> Result<Prepared, Error> {
        let policy = Policy::try_new(&config.tokens).map_err(Error::Policy)?;
        let mut start = Vec::new();
        let mut stores = BTreeMap::new();
        let mut http = client::HttpClients::new(config.tokens.request_timeout);
        let shares = |p: &config::Profile| p.cache == CacheMode::Shared && config.cache.is_some();
        let backend = match &config.cache {
            Some(c) if config.profiles_in_use().any(shares) => Some(match &self.backend {
                Some((kept, b)) if kept == c => (kept.clone(), Arc::clone(b)),
                _ => (c.clone(), cache::Backend::new(c, cache_metrics.clone())?),
            }),
            _ => None,
        };
        let wanted = config
            .profiles_in_use()
            .map(|p| {
                let cache = config.cache.clone().filter(|_| shares(p));
                Settings::Grant(Box::new((p.clone(), config.tokens.clone(), cache)))
            })
            .chain(config.statics_in_use().cloned().map(Settings::Static));
        // Which profiles keep their store, and which (re)start.
        let mut plan: Vec<(String, Settings, bool)> = wanted
            .map(|settings| {
                let name = match &settings {
                    Settings::Grant(g) => g.0.name.clone(),
                    Settings::Static(s) => s.name.clone(),
                };
                let kept = self
                    .running
                    .get(&name)
                    .is_some_and(|p| p.settings == settings);
                (name, settings, kept)
            })
            .collect();
        // A chain holds its subject's store: when the subject restarts,
        // so does every profile that exchanges its token.
        loop {
            let restarting: Vec<String> =
                plan.iter().filter(|p| !p.2).map(|p| p.0.clone()).collect();
            let mut changed = false;
            for (name, _, kept) in &mut plan {
                if *kept
                    && config
                        .subject_of(name)
                        .is_some_and(|s| restarting.iter().any(|r| r == s))
                {
                    *kept = false;
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        for (name, _, kept) in &plan {
            let store = match self.running.get(name).filter(|_| *kept) {
                Some(p) => Arc::clone(&p.store),
                None => Arc::new(
                    Store::new(name, config.tokens.unauthorized_refresh_interval)
                        .with_coalesced_counter(metrics.profile(name).coalesced),
                ),
            };
            stores.insert(name.clone(), store);
        }
        for (name, settings, kept) in plan {
            if kept {
                continue;
            }
            let store = Arc::clone(&stores[&name]);
            let obtain = match &settings {
                Settings::Grant(g) => {
                    let mut client = Client::new(&g.0, &mut http, policy.default_lifetime())?;
                    if let Some(d) = &g.0.dpop {
                        let key = crate::dpop::ProfileKey::new(&name, d.key_file.as_deref(), d.alg)
                            .map_err(|e| Error::Dpop(name.clone(), e))?;
                        client = client.with_dpop(Arc::new(key), metrics.dpop(&name));
                    }
                    if let Some(subject) = config.subject_of(&name).and_then(|s| stores.get(s)) {
                        client = client.with_subject(Arc::clone(subject));
                    }
                    let client = Arc::new(client);
                    match (&g.2, &backend) {
                        (Some(_), Some((_, b))) => Obtain::Shared(Arc::new(cache::Shared::new(
                            client,
                            Arc::clone(b),
                            &g.0,
                            config.tokens.request_timeout,
                            policy.clone(),
                        ))),
                        _ => Obtain::Grant(client),
                    }
                }
                Settings::Static(s) => Obtain::Static(s.credential_file.clone()),
            };
            start.push((name, settings, store, obtain));
        }
        Ok(Prepared {
            policy,
            start,
            stores,
            backend,
        })
    }

    /// Stops the tasks of profiles no longer in use or rebuilt, and starts
    /// the new ones. Returns the stores of the profiles now in use.
    pub fn commit(
        &mut self,
        prepared: Prepared,
        metrics: &TokenMetrics,
        cache_metrics: &CacheMetrics,
    ) -> Vec<Arc<Store>> {
        if self.backend.is_some() && prepared.backend.is_none() {
            cache_metrics.clear_up();
        }
        self.backend = prepared.backend;
        let removed: Vec<String> = self
            .running
            .keys()
            .filter(|name| {
                !prepared.stores.contains_key(*name)
                    || prepared.start.iter().any(|(n, _, _, _)| n == *name)
            })
            .cloned()
            .collect();
        for name in removed {
            if let Some(p) = self.running.remove(&name) {
                p.task.abort();
                if !prepared.stores.contains_key(&name) {
                    metrics.forget(&name);
                    cache_metrics.forget(&name);
                }
            }
        }
        for (name, settings, store, obtain) in prepared.start {
            let profile_metrics = metrics.profile(&name);
            let task = match obtain {
                Obtain::Grant(client) => tokio::spawn(crate::token::refresh::run(
                    Arc::clone(&store),
                    client,
                    prepared.policy.clone(),
                    profile_metrics,
                )),
                Obtain::Shared(shared) => tokio::spawn(crate::token::refresh::run(
                    Arc::clone(&store),
                    shared,
                    prepared.policy.clone(),
                    profile_metrics,
                )),
                Obtain::Static(path) => tokio::spawn(crate::token::static_credential::run(
                    Arc::clone(&store),
                    path,
                    profile_metrics,
                )),
            };
            self.running.insert(
                name,
                Running {
                    settings,
                    store,
                    task,
                },
            );
        }
        prepared.stores.into_values().collect()
    }

    /// The store of a profile in use.
    pub fn store(&self, profile: &str) -> Option<Arc<Store>> {
        self.running.get(profile).map(|p| Arc::clone(&p.store))
    }

    /// Stops every profile's task.
    pub fn abort_all(&mut self) {
        for (_, p) in self.running.drain() {
            p.task.abort();
        }
    }
}

impl Drop for Profiles {
    fn drop(&mut self) {
        for p in self.running.values() {
            p.task.abort();
        }
    }
}
