//! Tokens as a replica holds them in memory: a quarter smaller, the exact text back.
//!
//! GoTo's access and refresh tokens are JWTs, about 1,200 characters of base64url segments
//! joined by dots, and each replica holds two of them per client for as long as the client
//! exists ([`super::memory::HeldTokens`]): the largest part of its memory at scale (BENCHMARKS.md,
//! issue 11). A segment's bytes take three quarters of its text, so a token whose every segment
//! is canonical unpadded base64url is kept as those bytes; any other token is kept as its text.
//! Packing checks the round trip, so unpacking gives back exactly the text that was packed,
//! whatever GoTo sends. Both forms are zeroized when dropped and never printed.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use secrecy::{ExposeSecret, SecretSlice, SecretString};

use crate::secret::StoredTokens;

/// Tokens with both secrets packed.
pub(crate) type PackedTokens = StoredTokens<PackedSecret>;

pub(crate) fn pack(tokens: &StoredTokens) -> PackedTokens {
    tokens.map_secrets(PackedSecret::pack)
}

pub(crate) fn unpack(tokens: &PackedTokens) -> StoredTokens {
    tokens.map_secrets(PackedSecret::unpack)
}

/// The form tag: the text's UTF-8 bytes follow.
const TEXT: u8 = 0;
/// The form tag: dot-separated base64url segments follow, each as a little-endian `u16`
/// length and the decoded bytes.
const SEGMENTS: u8 = 1;

/// One token, packed.
#[derive(Clone)]
pub(crate) struct PackedSecret(SecretSlice<u8>);

impl PackedSecret {
    pub(crate) fn pack(secret: &SecretString) -> PackedSecret {
        let text = secret.expose_secret();
        let packed = segments(text)
            .filter(|packed| unpack_segments(packed).as_deref() == Some(text))
            .unwrap_or_else(|| {
                let mut packed = Vec::with_capacity(1 + text.len());
                packed.push(TEXT);
                packed.extend_from_slice(text.as_bytes());
                packed
            });
        PackedSecret(SecretSlice::from(packed))
    }

    pub(crate) fn unpack(&self) -> SecretString {
        let packed = self.0.expose_secret();
        let text = match packed.split_first() {
            Some((&SEGMENTS, _)) => unpack_segments(packed),
            Some((&TEXT, text)) => std::str::from_utf8(text).ok().map(str::to_owned),
            _ => None,
        };
        // Only `pack` makes a `PackedSecret`, and it checked that its form unpacks.
        SecretString::from(text.unwrap_or_default())
    }

    /// Bytes held (for the footprint test).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.0.expose_secret().len()
    }
}

impl PartialEq for PackedSecret {
    fn eq(&self, other: &Self) -> bool {
        self.0.expose_secret() == other.0.expose_secret()
    }
}

impl std::fmt::Debug for PackedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
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
        let packed = PackedSecret::pack(&SecretString::from(text));
        (packed.unpack().expose_secret().to_string(), packed.len())
    }

    #[test]
    fn a_jwt_is_kept_as_its_bytes() {
        let header = URL_SAFE_NO_PAD.encode(br#"{"kid":"oauthv2.lmi.com.0219","alg":"RS512"}"#);
        let payload = URL_SAFE_NO_PAD.encode([7u8; 600]);
        let signature = URL_SAFE_NO_PAD.encode([9u8; 256]);
        let jwt = format!("{header}.{payload}.{signature}");
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
    fn the_secret_is_not_printed() {
        let packed = PackedSecret::pack(&SecretString::from("eyJhbGciOiJub25lIn0.e30.c2ln"));
        assert_eq!(format!("{packed:?}"), "<redacted>");
    }

    proptest! {
        #[test]
        fn every_text_comes_back(text in ".{0,64}", segments in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..48), 1..4)) {
            prop_assert_eq!(round_trip(&text).0, text);
            let jwt = segments
                .iter()
                .map(|s| URL_SAFE_NO_PAD.encode(s))
                .collect::<Vec<_>>()
                .join(".");
            prop_assert_eq!(round_trip(&jwt).0, jwt);
        }
    }
}
