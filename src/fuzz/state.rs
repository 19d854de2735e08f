//! The signed OAuth `state`: valid ones round-trip; nothing else is accepted (bit flips,
//! truncations, concatenations, splices of two states, another key's signature, garbage).

use proptest::{prelude::*, test_runner::TestCaseResult};

use super::fuzz;
use crate::consent::state::{MAX_STATE_LEN, StateClaims, StateError, StateKey};

fn key() -> StateKey {
    StateKey::from_bytes(b"fuzzing-key-fuzzing-key-fuzzing-key").expect("32 bytes or more")
}

/// Claims with anything in them: the signer must cope with every string and number.
fn claims() -> impl Strategy<Value = StateClaims> {
    (
        (
            any::<String>(),
            "[a-z0-9-]{1,20}",
            any::<String>(),
            any::<String>(),
        ),
        (
            "[A-Za-z0-9_-]{0,30}",
            any::<i64>(),
            any::<String>(),
            any::<String>(),
        ),
    )
        .prop_map(
            |((namespace, name, uid, client_id), (nonce, expires_at, browser, link))| StateClaims {
                namespace,
                name,
                uid,
                client_id,
                nonce,
                expires_at,
                browser,
                link,
            },
        )
}

/// How a token is changed on its way back.
#[derive(Debug, Clone)]
enum Mutation {
    /// One bit of one byte (the result may be invalid UTF-8, then it is read lossily).
    FlipBit {
        at: usize,
        bit: u8,
    },
    Truncate {
        at: usize,
    },
    Append(String),
    Insert {
        at: usize,
        text: String,
    },
    Delete {
        at: usize,
        len: usize,
    },
    /// Another state's payload with this one's MAC, or the other way round.
    SplicePayload(StateClaims),
    /// This state twice, or followed by another one.
    Concatenate {
        separator: String,
        other: StateClaims,
    },
    /// The same claims signed by another key.
    OtherKey(Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit { at, bit }),
        2 => any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        1 => any::<String>().prop_map(Mutation::Append),
        1 => (any::<usize>(), "[A-Za-z0-9_.=-]{1,4}|.{1,4}")
            .prop_map(|(at, text)| Mutation::Insert { at, text }),
        2 => (any::<usize>(), 1usize..6).prop_map(|(at, len)| Mutation::Delete { at, len }),
        1 => claims().prop_map(Mutation::SplicePayload),
        1 => ("|\\.|,| |&state=", claims())
            .prop_map(|(separator, other)| Mutation::Concatenate { separator, other }),
        1 => proptest::collection::vec(any::<u8>(), 32..48).prop_map(Mutation::OtherKey),
    ]
}

fn mutate(key: &StateKey, claims: &StateClaims, token: &str, m: &Mutation) -> String {
    let len = token.len().max(1);
    match m {
        Mutation::FlipBit { at, bit } => {
            let mut bytes = token.as_bytes().to_vec();
            if let Some(b) = bytes.get_mut(at % len) {
                *b ^= 1 << bit;
            }
            String::from_utf8_lossy(&bytes).into_owned()
        }
        Mutation::Truncate { at } => token[..at % len].to_string(),
        Mutation::Append(text) => format!("{token}{text}"),
        Mutation::Insert { at, text } => {
            let at = at % len;
            format!("{}{text}{}", &token[..at], &token[at..])
        }
        Mutation::Delete { at, len: n } => {
            let at = at % len;
            let end = (at + n).min(token.len());
            format!("{}{}", &token[..at], &token[end..])
        }
        Mutation::SplicePayload(other) => {
            let other = key.sign(other);
            let (p1, t1) = token.split_once('.').unwrap_or((token, ""));
            let (p2, t2) = other.split_once('.').unwrap_or((&other, ""));
            if p1 == p2 {
                format!("{p1}.{t2}x")
            } else {
                format!("{p2}.{t1}")
            }
        }
        Mutation::Concatenate { separator, other } => {
            format!("{token}{separator}{}", key.sign(other))
        }
        Mutation::OtherKey(bytes) => {
            let other = StateKey::from_bytes(bytes).expect("long enough");
            if other.as_bytes() == key.as_bytes() {
                format!("{token}.")
            } else {
                other.sign(claims)
            }
        }
    }
}

/// The token `verify` returns for, when it is accepted, must be the one that was signed.
fn check(
    key: &StateKey,
    claims: &StateClaims,
    mutation: &Mutation,
    now: i64,
    cookie: &str,
    link: &str,
) -> TestCaseResult {
    let mut claims = claims.clone();
    claims.browser = key.browser_binding(cookie);
    claims.link = key.link_binding(link);
    let token = key.sign(&claims);
    prop_assert!(
        token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
        "a state must travel in a URL unescaped: {token}"
    );

    // A valid state round-trips, at every time before its expiry, or is too long to accept.
    let verified = key.verify(&token, i64::MIN);
    if token.len() > MAX_STATE_LEN {
        prop_assert_eq!(verified, Err(StateError::Malformed));
    } else {
        prop_assert_eq!(verified.as_ref(), Ok(&claims));
        let at_now = key.verify(&token, now);
        if claims.expires_at <= now {
            prop_assert_eq!(at_now, Err(StateError::Expired));
        } else {
            prop_assert_eq!(at_now, Ok(claims.clone()));
        }
        prop_assert_eq!(key.verify_browser(&claims, Some(cookie)), Ok(()));
        prop_assert_eq!(key.verify_link(&claims, Some(link)), Ok(()));
    }

    // A changed state is never accepted, whatever the change.
    let changed = mutate(key, &claims, &token, mutation);
    if changed != token {
        let result = key.verify(&changed, i64::MIN);
        prop_assert!(
            matches!(
                result,
                Err(StateError::Missing | StateError::Malformed | StateError::Forged)
            ),
            "a changed state was not refused: {changed:?} -> {result:?}"
        );
    }
    Ok(())
}

/// Arbitrary text, and text of the state alphabet (which gets past the shape checks).
fn garbage() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[A-Za-z0-9_-]{0,200}\\.[A-Za-z0-9_-]{0,60}",
        "[A-Za-z0-9_.-]{0,3000}",
    ]
}

#[test]
fn fuzz_signed_state() {
    let key = key();
    let input = (
        claims(),
        mutation(),
        any::<i64>(),
        "[A-Za-z0-9_-]{16,64}",
        "[A-Za-z0-9_-]{32,64}",
        garbage(),
    );
    fuzz(
        "signed_state",
        300,
        input,
        |(claims, mutation, now, cookie, link, garbage)| {
            check(&key, &claims, &mutation, now, &cookie, &link)?;
            // Another browser's cookie or another link never matches the bindings.
            let mut bound = claims.clone();
            bound.browser = key.browser_binding(&cookie);
            bound.link = key.link_binding(&link);
            let other_cookie = format!("{cookie}x");
            prop_assert_eq!(
                key.verify_browser(&bound, Some(&other_cookie)),
                Err(StateError::BrowserMismatch)
            );
            prop_assert_eq!(
                key.verify_link(&bound, Some(&format!("{link}x"))),
                Err(StateError::LinkReplaced)
            );
            // Nobody without the key makes a state that verifies.
            let result = key.verify(&garbage, i64::MIN);
            prop_assert!(
                matches!(
                    result,
                    Err(StateError::Missing | StateError::Malformed | StateError::Forged)
                ),
                "{garbage:?} -> {result:?}"
            );
            Ok(())
        },
    );
}
