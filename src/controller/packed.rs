//! Tokens as a replica holds them in memory: one zeroized buffer, the exact tokens back.
//!
//! Each replica holds a client's tokens for as long as the client exists
//! ([`super::memory::HeldTokens`]): at scale the largest part of its memory (BENCHMARKS.md,
//! issue 11). Held as a `StoredTokens` they took two secret buffers, nine strings and some
//! 300 bytes of struct. Packed, they are one buffer:
//!
//! - Each token is a JWT, about 1,200 characters of base64url segments joined by dots. A
//!   segment's bytes take three quarters of its text, so a token whose every segment is
//!   canonical unpadded base64url is kept as those bytes; any other token as its text.
//! - The non-secret facts follow as length-prefixed strings, whole seconds and tags.
//!
//! Stored tokens are packed without their access token ([`super::memory::HeldTokens`]).
//!
//! Decoding is total and packing checks the round trip, falling back to holding the tokens
//! as they are, so unpacking gives back exactly what was packed, whatever GoTo sends. The
//! buffer is zeroized when dropped and never printed.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jiff::Timestamp;
use secrecy::{ExposeSecret, SecretSlice, SecretString, zeroize::Zeroizing};

use crate::{resource::TokenGrant, secret::StoredTokens};

/// A client's tokens, packed.
#[derive(Clone)]
pub(crate) enum PackedTokens {
    Packed(SecretSlice<u8>),
    /// The tokens did not survive the round trip (none seen so far do): held as they are.
    Plain(Box<StoredTokens>),
}

impl PackedTokens {
    pub(crate) fn pack(tokens: &StoredTokens) -> PackedTokens {
        let mut out = Zeroizing::new(Vec::with_capacity(
            64 + tokens.access_token.expose_secret().len() * 2,
        ));
        encode(tokens, &mut out);
        let packed = SecretSlice::from(out.to_vec());
        match decode(packed.expose_secret()) == *tokens {
            true => PackedTokens::Packed(packed),
            false => PackedTokens::Plain(Box::new(tokens.clone())),
        }
    }

    pub(crate) fn unpack(&self) -> StoredTokens {
        match self {
            PackedTokens::Packed(packed) => decode(packed.expose_secret()),
            PackedTokens::Plain(tokens) => (**tokens).clone(),
        }
    }

    /// Bytes held on the heap (for the footprint test).
    #[cfg(test)]
    pub(crate) fn heap_len(&self) -> usize {
        match self {
            PackedTokens::Packed(packed) => packed.expose_secret().len(),
            PackedTokens::Plain(_) => std::mem::size_of::<StoredTokens>(),
        }
    }
}

impl PartialEq for PackedTokens {
    fn eq(&self, other: &Self) -> bool {
        self.unpack() == other.unpack()
    }
}

impl std::fmt::Debug for PackedTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A packed secret's form tag: the text's UTF-8 bytes follow.
const TEXT: u8 = 0;
/// A packed secret's form tag: dot-separated base64url segments follow, each as a
/// little-endian `u16` length and the decoded bytes.
const SEGMENTS: u8 = 1;

fn encode(t: &StoredTokens, out: &mut Vec<u8>) {
    put_secret(out, t.access_token.expose_secret());
    match &t.refresh_token {
        Some(refresh) => {
            out.push(1);
            put_secret(out, refresh.expose_secret());
        }
        None => out.push(0),
    }
    put_str(out, &t.token_type);
    for at in [
        t.expires_at,
        t.issued_at,
        t.authorized_at,
        t.refresh_token_obtained_at,
    ] {
        out.extend_from_slice(&at.as_second().to_le_bytes());
        out.extend_from_slice(&at.subsec_nanosecond().to_le_bytes());
    }
    for text in [&t.scope, &t.principal, &t.account_key, &t.organizer_key] {
        match text {
            Some(text) => {
                out.push(1);
                put_str(out, text);
            }
            None => out.push(0),
        }
    }
    put_str(out, &t.client_id);
    put_str(out, &t.token_url);
    out.push(match t.obtained_by {
        TokenGrant::AuthorizationCode => 0,
        TokenGrant::PersonalAccessToken => 1,
    });
}

/// Total: a short or damaged buffer decodes to blanks (which `pack`'s round trip rejects).
fn decode(packed: &[u8]) -> StoredTokens {
    let mut r = Reader(packed);
    let access_token = secret(r.bytes());
    let refresh_token = (r.byte() == 1).then(|| secret(r.bytes()));
    let token_type = r.string();
    let mut at = || {
        let second = i64::from_le_bytes(r.array());
        let nanosecond = i32::from_le_bytes(r.array());
        Timestamp::new(second, nanosecond).unwrap_or(Timestamp::UNIX_EPOCH)
    };
    let (expires_at, issued_at, authorized_at, refresh_token_obtained_at) =
        (at(), at(), at(), at());
    let mut optional = || (r.byte() == 1).then(|| r.string());
    let (scope, principal, account_key, organizer_key) =
        (optional(), optional(), optional(), optional());
    StoredTokens {
        access_token,
        refresh_token,
        token_type,
        expires_at,
        issued_at,
        authorized_at,
        refresh_token_obtained_at,
        scope,
        principal,
        account_key,
        organizer_key,
        client_id: r.string(),
        token_url: r.string(),
        obtained_by: match r.byte() {
            1 => TokenGrant::PersonalAccessToken,
            _ => TokenGrant::AuthorizationCode,
        },
    }
}

fn put_str(out: &mut Vec<u8>, text: &str) {
    put_bytes(out, text.as_bytes());
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    // Longer than 4 GiB cannot come from a token endpoint's bounded response; the length
    // would be cut and `pack`'s round trip falls back to the plain form.
    out.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// A secret as its segments when every dot-separated part is base64url without padding and
/// encodes back to the same text, otherwise as its text.
fn put_secret(out: &mut Vec<u8>, text: &str) {
    let packed = Zeroizing::new(
        segments(text)
            .filter(|packed| !text.is_empty() && unpack_segments(packed).as_deref() == Some(text))
            .unwrap_or_else(|| {
                let mut packed = Vec::with_capacity(1 + text.len());
                packed.push(TEXT);
                packed.extend_from_slice(text.as_bytes());
                packed
            }),
    );
    put_bytes(out, &packed);
}

fn secret(packed: &[u8]) -> SecretString {
    let text = match packed.split_first() {
        Some((&SEGMENTS, _)) => unpack_segments(packed),
        Some((&TEXT, text)) => std::str::from_utf8(text).ok().map(str::to_owned),
        _ => None,
    };
    SecretString::from(text.unwrap_or_default())
}

/// Reads what [`encode`] wrote; past the end, everything is empty or zero.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.0.split_at(n.min(self.0.len()));
        self.0 = tail;
        head
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut array = [0; N];
        let head = self.take(N);
        array[..head.len()].copy_from_slice(head);
        array
    }

    fn byte(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    fn bytes(&mut self) -> &'a [u8] {
        let len = u32::from_le_bytes(self.array());
        self.take(usize::try_from(len).unwrap_or(usize::MAX))
    }

    fn string(&mut self) -> String {
        String::from_utf8_lossy(self.bytes()).into_owned()
    }
}

/// `text` as segments, when every dot-separated part is base64url without padding and fits.
fn segments(text: &str) -> Option<Vec<u8>> {
    let mut packed = Vec::with_capacity(1 + text.len() * 3 / 4 + 8);
    packed.push(SEGMENTS);
    for segment in text.split('.') {
        let bytes = URL_SAFE_NO_PAD.decode(segment).ok()?;
        let len = u16::try_from(bytes.len()).ok()?;
        packed.extend_from_slice(&len.to_le_bytes());
        packed.extend_from_slice(&bytes);
    }
    Some(packed)
}

fn unpack_segments(packed: &[u8]) -> Option<String> {
    let (&SEGMENTS, mut rest) = packed.split_first()? else {
        return None;
    };
    let mut text = String::with_capacity(rest.len() * 4 / 3 + 4);
    let mut first = true;
    while !rest.is_empty() {
        let (len, tail) = rest.split_first_chunk::<2>()?;
        let len = usize::from(u16::from_le_bytes(*len));
        let (bytes, tail) = tail.split_at_checked(len)?;
        if !std::mem::take(&mut first) {
            text.push('.');
        }
        URL_SAFE_NO_PAD.encode_string(bytes, &mut text);
        rest = tail;
    }
    Some(text)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn round_trip(text: &str) -> (String, usize) {
        let mut out = Vec::new();
        put_secret(&mut out, text);
        let back = secret(Reader(&out).bytes());
        (back.expose_secret().to_string(), out.len() - 4)
    }

    fn jwt(payload: &[u8]) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"kid":"oauthv2.lmi.com.0219","alg":"RS512"}"#);
        let payload = URL_SAFE_NO_PAD.encode(payload);
        let signature = URL_SAFE_NO_PAD.encode([9u8; 256]);
        format!("{header}.{payload}.{signature}")
    }

    fn tokens() -> StoredTokens {
        let mut tokens = crate::controller::fixtures::tokens(
            "2026-12-03T10:00:00Z",
            "2026-12-01T10:00:00.5Z",
            &jwt(&[3u8; 600]),
        );
        tokens.access_token = SecretString::from(jwt(&[7u8; 600]));
        tokens.principal = Some("admin@example.com".into());
        tokens.account_key = None;
        tokens.obtained_by = TokenGrant::PersonalAccessToken;
        tokens
    }

    #[test]
    fn a_jwt_is_kept_as_its_bytes() {
        let jwt = jwt(&[7u8; 600]);
        let (back, len) = round_trip(&jwt);
        assert_eq!(back, jwt);
        assert!(
            len * 4 < jwt.len() * 3 + 40,
            "{len} bytes for {} characters",
            jwt.len()
        );
    }

    #[test]
    fn anything_else_is_kept_as_text() {
        for text in [
            "",
            ".",
            "a",
            "opaque-refresh-token",
            "padded==",
            "abc=.def",
            "a b",
            // Decodes, but encodes back differently (non-zero trailing bits): kept as text.
            "AB",
            "ümlaut.token",
        ] {
            let (back, len) = round_trip(text);
            assert_eq!(back, text);
            assert!(len <= text.len() + 1 + 2 * text.split('.').count());
        }
    }

    #[test]
    fn tokens_come_back_exactly_from_one_buffer() {
        let tokens = tokens();
        let packed = PackedTokens::pack(&tokens);
        assert!(matches!(packed, PackedTokens::Packed(_)));
        assert_eq!(packed.unpack(), tokens);
        let text = tokens.access_token.expose_secret().len()
            + tokens
                .refresh_token
                .as_ref()
                .map_or(0, |r| r.expose_secret().len());
        assert!(
            packed.heap_len() * 4 < text * 3 + 800,
            "{} bytes for {text} characters of tokens",
            packed.heap_len()
        );
    }

    #[test]
    fn a_damaged_buffer_decodes_to_blanks() {
        let mut out = Vec::new();
        encode(&tokens(), &mut out);
        for len in [0, 3, 40, out.len() - 1] {
            let back = decode(&out[..len]);
            assert_ne!(back, tokens(), "cut at {len}");
        }
    }

    #[test]
    fn the_secret_is_not_printed() {
        let packed = PackedTokens::pack(&tokens());
        assert_eq!(format!("{packed:?}"), "<redacted>");
    }

    proptest! {
        #[test]
        fn every_text_comes_back(text in ".{0,64}", segments in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..48), 1..4)) {
            prop_assert_eq!(round_trip(&text).0, text.clone());
            let jwt = segments
                .iter()
                .map(|s| URL_SAFE_NO_PAD.encode(s))
                .collect::<Vec<_>>()
                .join(".");
            prop_assert_eq!(round_trip(&jwt).0, jwt.clone());
            let mut tokens = tokens();
            tokens.access_token = SecretString::from(jwt);
            tokens.principal = Some(text.clone());
            tokens.scope = (!text.is_empty()).then(|| text.clone());
            tokens.token_type = text;
            prop_assert_eq!(PackedTokens::pack(&tokens).unpack(), tokens);
        }
    }
}
