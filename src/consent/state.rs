//! The OAuth `state` parameter: a signed, expiring token that ties a callback to one
//! authorization attempt, one resource, and the browser that started it.
//!
//! The operator keeps no per-attempt server state for the round trip through GoTo, so the
//! `state` value itself carries the claims (which resource, a nonce for single use, an expiry,
//! and a binding to a browser cookie) and an HMAC-SHA256 over them. The HMAC key is shared by
//! every replica through a Secret ([`load_or_create_key`]), so any replica can verify a callback.
//!
//! The cookie value never appears in `state` (URLs leak into logs and histories); only a keyed
//! hash of it does. State MACs and browser bindings use distinct domain-separation prefixes:
//! without them, a browser whose cookie value equals an encoded claims payload would receive
//! (inside the state it is handed) a valid MAC for claims of its own choosing.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use rand::RngCore as _;
use secrecy::{ExposeSecret, SecretSlice};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// How long an authorization attempt may take, from the redirect to GoTo to the callback.
pub const STATE_TTL_SECONDS: i64 = 600;

/// The key inside the Secret that holds the HMAC key.
pub const STATE_KEY_SECRET_KEY: &str = "state-hmac-key";

/// Length of a generated key, and the minimum accepted from a Secret.
pub const STATE_KEY_LEN: usize = 32;

/// Longest `state` accepted; real ones are a few hundred characters. Bounds the work an
/// unauthenticated caller can cause before the MAC check.
pub const MAX_STATE_LEN: usize = 2048;

/// Length of an HMAC-SHA256 tag.
const MAC_LEN: usize = 32;

const STATE_DOMAIN: &[u8] = b"goto-oauth-operator/state/v1\0";
const BROWSER_DOMAIN: &[u8] = b"goto-oauth-operator/browser/v1\0";
const LINK_DOMAIN: &[u8] = b"goto-oauth-operator/link/v1\0";

/// What a `state` vouches for.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StateClaims {
    pub namespace: String,
    pub name: String,
    /// The resource's uid, so a deleted and re-created namesake cannot receive the tokens.
    pub uid: String,
    /// The OAuth client the code will be issued to; a code can only be exchanged by that client,
    /// so a callback arriving after the client id changed is refused instead of failing at GoTo.
    pub client_id: String,
    /// Single-use marker; the caller records used nonces.
    pub nonce: String,
    /// Unix seconds after which the state is no longer accepted.
    pub expires_at: i64,
    /// [`StateKey::browser_binding`] of the browser's cookie.
    pub browser: String,
    /// [`StateKey::link_binding`] of the authorization link that minted this state: once the
    /// resource publishes another link (rotated, or spent by a successful consent), attempts
    /// still in flight from the old one are refused. Empty in states of earlier releases,
    /// which therefore never match.
    #[serde(default)]
    pub link: String,
}

/// Why a `state` (or the browser presenting it) was refused. Display texts are for logs and
/// pages; they contain nothing from the token.
#[derive(thiserror::Error, Debug, PartialEq)]
pub enum StateError {
    #[error("the state parameter is missing")]
    Missing,
    #[error("the state parameter is malformed")]
    Malformed,
    #[error("the state parameter has an invalid signature")]
    Forged,
    #[error("the authorization attempt expired")]
    Expired,
    #[error("the authorization attempt was already used")]
    Replayed,
    #[error("the browser binding cookie is missing")]
    CookieMissing,
    #[error("the callback came from a different browser")]
    BrowserMismatch,
    #[error("the state signing key is invalid (it must be at least {STATE_KEY_LEN} bytes)")]
    KeyInvalid,
    #[error("the authorization link this attempt started from was replaced or already used")]
    LinkReplaced,
}

impl StateError {
    /// A short, fixed, machine-readable label (metrics, logs, condition messages).
    pub fn reason(&self) -> &'static str {
        match self {
            StateError::Missing => "state_missing",
            StateError::Malformed => "state_malformed",
            StateError::Forged => "state_forged",
            StateError::Expired => "state_expired",
            StateError::Replayed => "state_replayed",
            StateError::CookieMissing => "cookie_missing",
            StateError::BrowserMismatch => "browser_mismatch",
            StateError::KeyInvalid => "state_key_invalid",
            StateError::LinkReplaced => "link_replaced",
        }
    }
}

/// The HMAC key for `state` tokens and browser bindings. Zeroed on drop; `Debug` is redacted.
#[derive(Clone)]
pub struct StateKey(SecretSlice<u8>);

impl fmt::Debug for StateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StateKey([redacted])")
    }
}

impl StateKey {
    /// A fresh key of [`STATE_KEY_LEN`] bytes from the thread-local CSPRNG.
    pub fn generate() -> Self {
        let mut bytes = vec![0u8; STATE_KEY_LEN];
        rand::rng().fill_bytes(&mut bytes);
        StateKey(SecretSlice::from(bytes))
    }

    /// A key from stored bytes; at least [`STATE_KEY_LEN`] bytes, else `KeyInvalid`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StateError> {
        if bytes.len() < STATE_KEY_LEN {
            return Err(StateError::KeyInvalid);
        }
        Ok(StateKey(SecretSlice::from(bytes.to_vec())))
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.0.expose_secret()
    }

    fn mac(&self, domain: &[u8], message: &[u8]) -> HmacSha256 {
        // HMAC accepts keys of any length, so this cannot fail; the fallback only keeps the
        // signature free of a panic path.
        let mut mac = HmacSha256::new_from_slice(self.as_bytes())
            .unwrap_or_else(|_| HmacSha256::new(&Default::default()));
        mac.update(domain);
        mac.update(message);
        mac
    }

    /// `base64url(json(claims)) "." base64url(HMAC-SHA256)`, URL-safe without escaping.
    pub fn sign(&self, claims: &StateClaims) -> String {
        // Serialising a struct of strings and integers cannot fail.
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap_or_default());
        let tag = self
            .mac(STATE_DOMAIN, payload.as_bytes())
            .finalize()
            .into_bytes();
        format!("{payload}.{}", URL_SAFE_NO_PAD.encode(tag))
    }

    /// Checks length and shape, then the MAC (constant time, before the payload is parsed),
    /// then expiry: `Expired` from the second `expires_at` on (`expires_at <= now_unix`).
    /// Pass `i64::MIN` to check only the signature.
    pub fn verify(&self, token: &str, now_unix: i64) -> Result<StateClaims, StateError> {
        if token.is_empty() {
            return Err(StateError::Missing);
        }
        if token.len() > MAX_STATE_LEN {
            return Err(StateError::Malformed);
        }
        let (payload, tag) = token.split_once('.').ok_or(StateError::Malformed)?;
        if payload.is_empty() || !is_base64url(payload) || !is_base64url(tag) {
            return Err(StateError::Malformed);
        }
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| StateError::Malformed)?;
        if tag.len() != MAC_LEN {
            return Err(StateError::Malformed);
        }
        self.mac(STATE_DOMAIN, payload.as_bytes())
            .verify_slice(&tag)
            .map_err(|_| StateError::Forged)?;
        // Authentic from here on, so a parse failure means a key holder signed something odd.
        let json = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| StateError::Malformed)?;
        let claims: StateClaims =
            serde_json::from_slice(&json).map_err(|_| StateError::Malformed)?;
        if claims.expires_at <= now_unix {
            return Err(StateError::Expired);
        }
        Ok(claims)
    }

    /// Keyed hash of the browser cookie, base64url; goes into [`StateClaims::browser`].
    pub fn browser_binding(&self, cookie_value: &str) -> String {
        URL_SAFE_NO_PAD.encode(
            self.mac(BROWSER_DOMAIN, cookie_value.as_bytes())
                .finalize()
                .into_bytes(),
        )
    }

    /// Keyed hash of an authorization link token, base64url; goes into [`StateClaims::link`].
    /// The link token itself never travels in `state` (it is a bearer credential).
    pub fn link_binding(&self, link_token: &str) -> String {
        URL_SAFE_NO_PAD.encode(
            self.mac(LINK_DOMAIN, link_token.as_bytes())
                .finalize()
                .into_bytes(),
        )
    }

    /// Checks that `claims` were minted from `current_link`, the link the resource publishes
    /// now (constant-time compare). No current link, or another one, is `LinkReplaced`.
    pub fn verify_link(
        &self,
        claims: &StateClaims,
        current_link: Option<&str>,
    ) -> Result<(), StateError> {
        let current = current_link.ok_or(StateError::LinkReplaced)?;
        let expected = URL_SAFE_NO_PAD
            .decode(&claims.link)
            .map_err(|_| StateError::LinkReplaced)?;
        self.mac(LINK_DOMAIN, current.as_bytes())
            .verify_slice(&expected)
            .map_err(|_| StateError::LinkReplaced)
    }

    /// Checks that the browser presenting `claims` holds the cookie they were bound to
    /// (constant-time compare). `None` or an empty cookie is `CookieMissing`.
    pub fn verify_browser(
        &self,
        claims: &StateClaims,
        cookie_value: Option<&str>,
    ) -> Result<(), StateError> {
        let cookie = cookie_value
            .filter(|c| !c.is_empty())
            .ok_or(StateError::CookieMissing)?;
        let expected = URL_SAFE_NO_PAD
            .decode(&claims.browser)
            .map_err(|_| StateError::BrowserMismatch)?;
        self.mac(BROWSER_DOMAIN, cookie.as_bytes())
            .verify_slice(&expected)
            .map_err(|_| StateError::BrowserMismatch)
    }
}

fn is_base64url(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `bytes` bytes from the thread-local CSPRNG (ChaCha, seeded from the OS), base64url without
/// padding. For nonces, cookie values and link tokens.
pub fn random_token(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    URL_SAFE_NO_PAD.encode(buf)
}

/// Why the state key could not be loaded or created.
#[derive(thiserror::Error, Debug)]
pub enum StateKeyError {
    #[error("reading state key Secret {namespace}/{name} failed: {source}")]
    Read {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("creating state key Secret {namespace}/{name} failed: {source}")]
    Create {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "state key Secret {namespace}/{name} has no usable key {STATE_KEY_SECRET_KEY:?} \
         (it must hold at least {STATE_KEY_LEN} bytes); delete the Secret to have a new key generated"
    )]
    Invalid { namespace: String, name: String },
    #[error("state key Secret {namespace}/{name} vanished right after another replica created it")]
    Vanished { namespace: String, name: String },
}

fn key_from_secret(secret: &Secret) -> Option<StateKey> {
    let bytes = secret.data.as_ref()?.get(STATE_KEY_SECRET_KEY)?;
    StateKey::from_bytes(&bytes.0).ok()
}

/// Loads the shared HMAC key from `namespace/secret_name`, creating the Secret with a fresh key
/// if it does not exist. When two replicas race to create it, the loser (409 AlreadyExists)
/// reads and uses the winner's key, so all replicas agree. The key is never logged.
pub async fn load_or_create_key(
    client: kube::Client,
    namespace: &str,
    secret_name: &str,
) -> Result<StateKey, StateKeyError> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let read_error = |source| StateKeyError::Read {
        namespace: namespace.to_string(),
        name: secret_name.to_string(),
        source,
    };
    let invalid = || StateKeyError::Invalid {
        namespace: namespace.to_string(),
        name: secret_name.to_string(),
    };

    if let Some(existing) = api.get_opt(secret_name).await.map_err(read_error)? {
        return key_from_secret(&existing).ok_or_else(invalid);
    }

    let key = StateKey::generate();
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(secret_name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_string(),
                "goto-oauth-operator".to_string(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_string()),
        data: Some(BTreeMap::from([(
            STATE_KEY_SECRET_KEY.to_string(),
            ByteString(key.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(
                namespace,
                name = secret_name,
                "created the state signing key Secret"
            );
            Ok(key)
        }
        Err(kube::Error::Api(status)) if status.is_already_exists() || status.code == 409 => {
            let theirs = api.get_opt(secret_name).await.map_err(read_error)?;
            let theirs = theirs.ok_or_else(|| StateKeyError::Vanished {
                namespace: namespace.to_string(),
                name: secret_name.to_string(),
            })?;
            key_from_secret(&theirs).ok_or_else(invalid)
        }
        Err(source) => Err(StateKeyError::Create {
            namespace: namespace.to_string(),
            name: secret_name.to_string(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn claims() -> StateClaims {
        StateClaims {
            namespace: "team-a".into(),
            name: "goto".into(),
            uid: "0b6f6f7e-1d5c-4b7a-9a59-8f0c0a8d6f11".into(),
            client_id: "a20abc4f-868a-4339-934f-4da2d788d0aa".into(),
            nonce: random_token(16),
            expires_at: NOW + STATE_TTL_SECONDS,
            browser: "placeholder".into(),
            link: key().link_binding("the-link-token"),
        }
    }

    fn key() -> StateKey {
        StateKey::from_bytes(&[7u8; 32]).unwrap()
    }

    /// Flips one character of `s` at `index` to another character of the base64url alphabet.
    fn flip(s: &str, index: usize) -> String {
        let mut bytes = s.as_bytes().to_vec();
        bytes[index] = if bytes[index] == b'A' { b'B' } else { b'A' };
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn round_trip() {
        let key = key();
        let mut c = claims();
        c.browser = key.browser_binding("cookie-1");
        let token = key.sign(&c);
        assert!(token.len() < 600);
        assert!(
            token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        );
        assert_eq!(key.verify(&token, NOW).unwrap(), c);
        assert_eq!(key.verify(&token, NOW + STATE_TTL_SECONDS - 1).unwrap(), c);
        assert_eq!(key.verify(&token, i64::MIN).unwrap(), c);
    }

    #[test]
    fn tampered_payload_or_mac_is_forged() {
        let key = key();
        let token = key.sign(&claims());
        let dot = token.find('.').unwrap();
        assert_eq!(key.verify(&flip(&token, 3), NOW), Err(StateError::Forged));
        assert_eq!(
            key.verify(&flip(&token, dot + 5), NOW),
            Err(StateError::Forged)
        );

        // Re-encoded claims with a different namespace, old MAC.
        let mut evil = claims();
        evil.namespace = "team-b".into();
        let forged_payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&evil).unwrap());
        let forged = format!("{forged_payload}{}", &token[dot..]);
        assert_eq!(key.verify(&forged, NOW), Err(StateError::Forged));
    }

    #[test]
    fn other_key_is_forged() {
        let token = key().sign(&claims());
        assert_eq!(
            StateKey::generate().verify(&token, NOW),
            Err(StateError::Forged)
        );
    }

    #[test]
    fn garbage_is_malformed_and_empty_is_missing() {
        let key = key();
        assert_eq!(key.verify("", NOW), Err(StateError::Missing));
        for garbage in [
            "nodot",
            ".abc",
            "abc.",
            "a b.c",
            "abc.def",
            "äöü.xyz",
            "abc.de+f/",
        ] {
            assert_eq!(
                key.verify(garbage, NOW),
                Err(StateError::Malformed),
                "{garbage}"
            );
        }
        // Truncated MAC.
        let token = key.sign(&claims());
        assert_eq!(
            key.verify(&token[..token.len() - 2], NOW),
            Err(StateError::Malformed)
        );
    }

    #[test]
    fn overlong_is_malformed_before_anything_else() {
        let key = key();
        let token = "A".repeat(MAX_STATE_LEN + 1);
        assert_eq!(key.verify(&token, NOW), Err(StateError::Malformed));
        // Even a correctly signed but huge state is refused.
        let mut c = claims();
        c.name = "n".repeat(MAX_STATE_LEN);
        assert_eq!(key.verify(&key.sign(&c), NOW), Err(StateError::Malformed));
    }

    #[test]
    fn expired() {
        let key = key();
        let token = key.sign(&claims());
        assert_eq!(
            key.verify(&token, NOW + STATE_TTL_SECONDS + 1),
            Err(StateError::Expired)
        );
        // The expiry second itself is past: a replica whose consumed-state entry is dropped
        // at that second must not accept the state again.
        assert_eq!(
            key.verify(&token, NOW + STATE_TTL_SECONDS),
            Err(StateError::Expired)
        );
        assert!(key.verify(&token, NOW + STATE_TTL_SECONDS - 1).is_ok());
    }

    #[test]
    fn a_state_is_bound_to_the_link_that_minted_it() {
        let key = key();
        let claims = claims();
        assert_eq!(key.verify_link(&claims, Some("the-link-token")), Ok(()));
        assert_eq!(
            key.verify_link(&claims, Some("a-newer-link-token")),
            Err(StateError::LinkReplaced)
        );
        assert_eq!(
            key.verify_link(&claims, None),
            Err(StateError::LinkReplaced)
        );
        let legacy = StateClaims {
            link: String::new(),
            ..claims
        };
        assert_eq!(
            key.verify_link(&legacy, Some("the-link-token")),
            Err(StateError::LinkReplaced)
        );
    }

    #[test]
    fn browser_binding_differs_per_cookie_and_key_and_verifies() {
        let key = key();
        let a = key.browser_binding("cookie-a");
        assert_eq!(a, key.browser_binding("cookie-a"));
        assert_ne!(a, key.browser_binding("cookie-b"));
        assert_ne!(a, StateKey::generate().browser_binding("cookie-a"));
        assert!(!a.contains("cookie"));

        let mut c = claims();
        c.browser = a;
        assert_eq!(key.verify_browser(&c, Some("cookie-a")), Ok(()));
        assert_eq!(
            key.verify_browser(&c, Some("cookie-b")),
            Err(StateError::BrowserMismatch)
        );
        assert_eq!(key.verify_browser(&c, None), Err(StateError::CookieMissing));
        assert_eq!(
            key.verify_browser(&c, Some("")),
            Err(StateError::CookieMissing)
        );
    }

    #[test]
    fn a_binding_cannot_serve_as_a_state_mac() {
        // The attack domain separation prevents: cookie = encoded claims of the attacker's choice.
        let key = key();
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims()).unwrap());
        let token = format!("{payload}.{}", key.browser_binding(&payload));
        assert_eq!(key.verify(&token, NOW), Err(StateError::Forged));
    }

    #[test]
    fn keys() {
        assert_eq!(
            StateKey::from_bytes(&[1u8; 31]).unwrap_err(),
            StateError::KeyInvalid
        );
        assert_eq!(
            StateKey::from_bytes(&[1u8; 48]).unwrap().as_bytes().len(),
            48
        );
        let a = StateKey::generate();
        assert_eq!(a.as_bytes().len(), STATE_KEY_LEN);
        assert_ne!(a.as_bytes(), StateKey::generate().as_bytes());
        assert_eq!(format!("{a:?}"), "StateKey([redacted])");
    }

    #[test]
    fn random_tokens() {
        let t = random_token(32);
        assert_eq!(t.len(), 43);
        assert_eq!(URL_SAFE_NO_PAD.decode(&t).unwrap().len(), 32);
        assert_ne!(t, random_token(32));
        assert_eq!(random_token(16).len(), 22);
    }

    #[test]
    fn reasons_are_distinct() {
        let all = [
            StateError::Missing,
            StateError::Malformed,
            StateError::Forged,
            StateError::Expired,
            StateError::Replayed,
            StateError::CookieMissing,
            StateError::BrowserMismatch,
            StateError::KeyInvalid,
            StateError::LinkReplaced,
        ];
        let reasons: std::collections::BTreeSet<_> = all.iter().map(StateError::reason).collect();
        assert_eq!(reasons.len(), all.len());
    }
}
