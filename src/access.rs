//! Who may do what: API keys for backends, signed subscribe tokens for viewers, and the
//! per-key creation rate limit. Knows nothing of HTTP; `api::auth` maps it to requests.
//!
//! A subscribe token is `v1.<generation id>.<expiry unix seconds>.<signature>`, the signature
//! being base64url(HMAC-SHA256(key, "v1.<generation id>.<expiry>")). It names the generation it
//! grants, so a token for another generation is refused before the generation is even looked
//! up: an answer never tells whether a generation exists.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use hmac::{Hmac, KeyInit, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{AccessConfig, LimitsConfig};

const TOKEN_VERSION: &str = "v1";
/// Below this, an HMAC key is guessable.
pub const MIN_TOKEN_KEY_BYTES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("the subscribe token key must be at least {MIN_TOKEN_KEY_BYTES} bytes")]
    WeakTokenKey,
}

/// Why a credential was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("missing credentials")]
    Missing,
    #[error("invalid credentials")]
    Invalid,
    #[error("the token has expired")]
    Expired,
    #[error("the token is for another generation")]
    WrongGeneration,
}

/// An accepted API key, by position in the configured list (never the key itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub usize);

pub struct Access {
    /// SHA-256 of each key: comparing fixed-size digests in constant time leaks neither the
    /// keys' contents nor their lengths.
    key_digests: Vec<[u8; 32]>,
    /// Each key's metrics label, index for index: `key-` and a short hash, never the key.
    key_labels: Vec<String>,
    token_key: Vec<u8>,
    token_ttl: Duration,
    limiter: RateLimiter,
}

impl Access {
    pub fn new(config: &AccessConfig, limits: &LimitsConfig) -> Result<Self, AccessError> {
        let token_key = match &config.subscribe_token_key {
            Some(key) if key.expose().len() < MIN_TOKEN_KEY_BYTES => {
                return Err(AccessError::WeakTokenKey)
            }
            Some(key) => key.expose().as_bytes().to_vec(),
            None => {
                let mut key = vec![0; MIN_TOKEN_KEY_BYTES];
                rand::rng().fill_bytes(&mut key);
                key
            }
        };
        Ok(Self {
            key_digests: config.api_keys.iter().map(|k| digest(k.expose())).collect(),
            key_labels: config
                .api_keys
                .iter()
                .map(|k| key_label(k.expose()))
                .collect(),
            token_key,
            token_ttl: config.subscribe_token_ttl,
            limiter: RateLimiter::new(limits.create_rate, limits.create_burst),
        })
    }

    /// Whether backend calls need an API key.
    pub fn keys_required(&self) -> bool {
        !self.key_digests.is_empty()
    }

    /// Checks a bearer credential against every configured key, always all of them.
    pub fn check_api_key(&self, presented: &str) -> Option<KeyId> {
        let presented = digest(presented);
        let mut found = None;
        for (index, key) in self.key_digests.iter().enumerate() {
            if bool::from(key.ct_eq(&presented)) {
                found = Some(KeyId(index));
            }
        }
        found
    }

    /// The scope of an idempotency key sent with `key`: a short digest of the API key, the same
    /// on every instance (never the key), or `-` when no keys are configured.
    pub fn key_scope(&self, key: Option<KeyId>) -> String {
        let Some(digest) = key.and_then(|KeyId(index)| self.key_digests.get(index)) else {
            return "-".to_owned();
        };
        digest[..8]
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect()
    }

    /// A token that lets its bearer subscribe to `generation_id` until it expires.
    pub fn subscribe_token(&self, generation_id: &str) -> String {
        let expiry = unix_now().saturating_add(self.token_ttl.as_secs());
        let payload = format!("{TOKEN_VERSION}.{generation_id}.{expiry}");
        let signature = URL_SAFE_NO_PAD.encode(self.sign(&payload));
        format!("{payload}.{signature}")
    }

    /// Checks a subscribe token for `generation_id`.
    pub fn check_subscribe_token(&self, token: &str, generation_id: &str) -> Result<(), Denied> {
        let (payload, signature) = token.rsplit_once('.').ok_or(Denied::Invalid)?;
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| Denied::Invalid)?;
        if !bool::from(self.sign(payload).as_slice().ct_eq(&signature)) {
            return Err(Denied::Invalid);
        }
        let mut parts = payload.split('.');
        let (Some(TOKEN_VERSION), Some(granted), Some(expiry), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Denied::Invalid);
        };
        if granted != generation_id {
            return Err(Denied::WrongGeneration);
        }
        let expiry: u64 = expiry.parse().map_err(|_| Denied::Invalid)?;
        if expiry < unix_now() {
            return Err(Denied::Expired);
        }
        Ok(())
    }

    /// The label that names `key` in metrics; `anonymous` on a gateway without keys.
    pub fn key_label(&self, key: Option<KeyId>) -> &str {
        key.and_then(|KeyId(index)| self.key_labels.get(index))
            .map_or("anonymous", String::as_str)
    }

    /// Takes one creation from `key`'s budget; `Err` says how long until the next is allowed.
    pub fn take_creation(&self, key: Option<KeyId>) -> Result<(), Duration> {
        self.limiter.take(key)
    }

    fn sign(&self, payload: &str) -> Vec<u8> {
        // HMAC accepts keys of any length; this cannot fail.
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.token_key)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(payload.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }
}

fn digest(value: &str) -> [u8; 32] {
    Sha256::digest(value.as_bytes()).into()
}

/// `key-` and 32 bits of a domain-separated SHA-256 of the key: tells keys apart on a
/// dashboard, and is not the key's digest used for authentication.
fn key_label(key: &str) -> String {
    let hash = Sha256::digest(format!("tokenfan metrics label\0{key}").as_bytes());
    let mut label = String::from("key-");
    for byte in &hash[..4] {
        label.push_str(&format!("{byte:02x}"));
    }
    label
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A token bucket per API key (`None`: the one anonymous bucket of an open gateway).
struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<Option<KeyId>, Bucket>>,
}

struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl RateLimiter {
    fn new(rate: f64, burst: u32) -> Self {
        Self {
            rate: rate.max(f64::MIN_POSITIVE),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::default(),
        }
    }

    fn take(&self, key: Option<KeyId>) -> Result<(), Duration> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let bucket = buckets.entry(key).or_insert(Bucket {
            tokens: self.burst,
            updated: now,
        });
        let refill = now.duration_since(bucket.updated).as_secs_f64() * self.rate;
        bucket.tokens = (bucket.tokens + refill).min(self.burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / self.rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Secret};

    fn access(keys: &[&str]) -> Access {
        let mut config = Config::defaults();
        config.access.api_keys = keys.iter().map(|k| Secret::new(*k)).collect();
        Access::new(&config.access, &config.limits).unwrap()
    }

    #[test]
    fn api_keys_are_matched_by_position_and_only_exactly() {
        let access = access(&["old-key", "new-key"]);
        assert_eq!(access.check_api_key("new-key"), Some(KeyId(1)));
        assert_eq!(access.check_api_key("old-key"), Some(KeyId(0)));
        assert_eq!(access.check_api_key("new-ke"), None);
        assert_eq!(access.check_api_key(""), None);
    }

    #[test]
    fn key_labels_are_short_stable_hashes_never_the_key() {
        let access = access(&["sk-tokenfan-secret-0", "sk-tokenfan-secret-1"]);
        let (first, second) = (
            access.key_label(Some(KeyId(0))),
            access.key_label(Some(KeyId(1))),
        );
        assert!(first.starts_with("key-") && first.len() == 12, "{first}");
        assert_ne!(first, second);
        assert!(!first.contains("secret"));
        assert_eq!(
            first,
            self::access(&["sk-tokenfan-secret-0"]).key_label(Some(KeyId(0)))
        );
        assert_eq!(access.key_label(None), "anonymous");
    }

    #[test]
    fn subscribe_tokens_are_scoped_signed_and_expire() {
        let access = access(&[]);
        let token = access.subscribe_token("gen_a");
        assert_eq!(access.check_subscribe_token(&token, "gen_a"), Ok(()));
        assert_eq!(
            access.check_subscribe_token(&token, "gen_b"),
            Err(Denied::WrongGeneration)
        );
        let forged = token.replace("gen_a", "gen_b");
        assert_eq!(
            access.check_subscribe_token(&forged, "gen_b"),
            Err(Denied::Invalid)
        );
        assert_eq!(
            access.check_subscribe_token("garbage", "gen_a"),
            Err(Denied::Invalid)
        );
        let other_instance = self::access(&[]);
        assert_eq!(
            other_instance.check_subscribe_token(&token, "gen_a"),
            Err(Denied::Invalid)
        );

        let expired_payload = format!("v1.gen_a.{}", unix_now() - 1);
        let expired = format!(
            "{expired_payload}.{}",
            URL_SAFE_NO_PAD.encode(access.sign(&expired_payload))
        );
        assert_eq!(
            access.check_subscribe_token(&expired, "gen_a"),
            Err(Denied::Expired)
        );
    }

    #[test]
    fn rate_limiter_allows_the_burst_then_paces() {
        let limiter = RateLimiter::new(10.0, 3);
        for _ in 0..3 {
            assert!(limiter.take(Some(KeyId(0))).is_ok());
        }
        let wait = limiter.take(Some(KeyId(0))).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(100));
        assert!(
            limiter.take(Some(KeyId(1))).is_ok(),
            "keys have their own buckets"
        );
    }
}
