//! Who may post a webhook: Meta's `X-Hub-Signature-256`, Evolution's shared-secret
//! header and Evolution's optional HS256 JWT. Every comparison of a secret runs in
//! constant time, and all of it runs on the raw request bytes before any parsing.

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// Why a request was not authenticated. The variants are for logs and metrics; the
/// caller answers 401 for all of them and tells the client nothing more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Rejection {
    /// No signature, token or bearer header.
    #[error("missing credentials")]
    Missing,
    /// Present but not of the expected form (`sha256=<64 hex>`, three JWT parts, ...).
    #[error("malformed credentials")]
    Malformed,
    /// Well-formed but wrong.
    #[error("wrong signature or token")]
    Mismatch,
    /// A JWT whose signature is right but that has expired (or is not valid yet).
    #[error("expired token")]
    Expired,
}

/// Checks Meta's `X-Hub-Signature-256` header (`sha256=<lowercase hex HMAC-SHA256 of
/// the raw body, keyed with the app secret>`). Hex is accepted in either case.
pub(crate) fn verify_meta(app_secret: &[u8], body: &[u8], header: Option<&[u8]>) -> Result<(), Rejection> {
    let header = header.ok_or(Rejection::Missing)?;
    let hex_digest = header.strip_prefix(b"sha256=").ok_or(Rejection::Malformed)?;
    let mut expected = [0u8; 32];
    hex::decode_to_slice(hex_digest, &mut expected).map_err(|_| Rejection::Malformed)?;
    let mut mac = HmacSha256::new_from_slice(app_secret).map_err(|_| Rejection::Mismatch)?;
    mac.update(body);
    mac.verify_slice(&expected).map_err(|_| Rejection::Mismatch)
}

/// `sha256=<hex>` for a body, as Meta (and `disparo sandbox`) sign it.
pub fn sign_meta(app_secret: &[u8], body: &[u8]) -> String {
    // HMAC accepts keys of any length, so this never fails; an empty MAC would only
    // produce a signature nobody accepts.
    match HmacSha256::new_from_slice(app_secret) {
        Ok(mut mac) => {
            mac.update(body);
            format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
        }
        Err(_) => String::new(),
    }
}

/// Whether two secrets are equal, in time independent of their contents and lengths
/// (both are hashed first, so not even the length leaks).
pub(crate) fn secrets_match(expected: &[u8], given: &[u8]) -> bool {
    let a = Sha256::digest(expected);
    let b = Sha256::digest(given);
    !expected.is_empty() && bool::from(a.as_slice().ct_eq(b.as_slice()))
}

/// Tolerated clock skew for JWT `exp`/`iat`.
const JWT_LEEWAY_SECS: i64 = 60;

/// Checks an `Authorization: Bearer <jwt>` value as Evolution sends it when the
/// webhook's headers hold a `jwt_key`: HS256, payload `{iat, exp, app, action}`, valid
/// for ten minutes. The key is the Channel's webhook token.
pub(crate) fn verify_evolution_jwt(key: &[u8], authorization: &[u8], now: DateTime<Utc>) -> Result<(), Rejection> {
    let token = authorization
        .strip_prefix(b"Bearer ")
        .or_else(|| authorization.strip_prefix(b"bearer "))
        .ok_or(Rejection::Malformed)?;
    let mut parts = token.split(|b| *b == b'.');
    let (Some(header), Some(payload), Some(signature), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Rejection::Malformed);
    };
    let header: serde_json::Value = serde_json::from_slice(&base64url_decode(header).ok_or(Rejection::Malformed)?)
        .map_err(|_| Rejection::Malformed)?;
    if header.get("alg").and_then(|a| a.as_str()) != Some("HS256") {
        return Err(Rejection::Malformed);
    }
    let signature = base64url_decode(signature).ok_or(Rejection::Malformed)?;
    let mut mac = HmacSha256::new_from_slice(key).map_err(|_| Rejection::Mismatch)?;
    mac.update(&token[..header_and_payload_len(token)]);
    mac.verify_slice(&signature).map_err(|_| Rejection::Mismatch)?;
    let claims: serde_json::Value = serde_json::from_slice(&base64url_decode(payload).ok_or(Rejection::Malformed)?)
        .map_err(|_| Rejection::Malformed)?;
    let now = now.timestamp();
    let exp = claims.get("exp").and_then(|e| e.as_f64()).ok_or(Rejection::Malformed)?;
    if exp < (now - JWT_LEEWAY_SECS) as f64 {
        return Err(Rejection::Expired);
    }
    if let Some(iat) = claims.get("iat").and_then(|i| i.as_f64())
        && iat > (now + JWT_LEEWAY_SECS) as f64
    {
        return Err(Rejection::Expired);
    }
    Ok(())
}

/// Length of `header.payload` (the signed part) of a token with three parts.
fn header_and_payload_len(token: &[u8]) -> usize {
    token.iter().rposition(|b| *b == b'.').unwrap_or(token.len())
}

/// Decodes unpadded (or padded) base64url. JWTs are the only base64 this service reads,
/// which does not justify a dependency.
fn base64url_decode(input: &[u8]) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        } as u32)
    }
    let input = input.strip_suffix(b"==").or_else(|| input.strip_suffix(b"=")).unwrap_or(input);
    if input.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(input.len() * 3 / 4);
    for chunk in input.chunks(4) {
        let mut acc = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            acc |= value(*c)? << (18 - 6 * i);
        }
        out.push((acc >> 16) as u8);
        if chunk.len() > 2 {
            out.push((acc >> 8) as u8);
        }
        if chunk.len() > 3 {
            out.push(acc as u8);
        }
    }
    Some(out)
}

/// Encodes unpadded base64url (tests and the benchmark sign JWTs with it).
pub(crate) fn base64url_encode(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let acc = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((acc >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// An HS256 JWT as Evolution builds it (`{iat, exp: iat + 600, app, action}`), for
/// tests and rehearsals.
pub fn sign_evolution_jwt(key: &[u8], issued_at: DateTime<Utc>) -> String {
    let header = base64url_encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let iat = issued_at.timestamp();
    let claims = serde_json::json!({"iat": iat, "exp": iat + 600, "app": "evolution", "action": "webhook"});
    let payload = base64url_encode(claims.to_string().as_bytes());
    let signed = format!("{header}.{payload}");
    let signature = match HmacSha256::new_from_slice(key) {
        Ok(mut mac) => {
            mac.update(signed.as_bytes());
            base64url_encode(&mac.finalize().into_bytes())
        }
        Err(_) => String::new(),
    };
    format!("{signed}.{signature}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &[u8] = br#"{"object":"whatsapp_business_account","entry":[]}"#;

    #[test]
    fn meta_test_vector_of_providers_md() {
        let good = b"sha256=dec6a680679a968e7e0319355b23599cbfc54502c0784668e9618baa0c633756";
        assert_eq!(sign_meta(b"test_app_secret", BODY).as_bytes(), good);
        assert_eq!(verify_meta(b"test_app_secret", BODY, Some(good)), Ok(()));
        assert_eq!(
            verify_meta(b"test_app_secret", BODY, Some(&good.to_ascii_uppercase()[..])),
            Err(Rejection::Malformed),
            "prefix is lowercase"
        );
        let upper_hex = b"sha256=DEC6A680679A968E7E0319355B23599CBFC54502C0784668E9618BAA0C633756";
        assert_eq!(verify_meta(b"test_app_secret", BODY, Some(upper_hex)), Ok(()));
        // one space before the final brace: the raw bytes matter
        let spaced = br#"{"object":"whatsapp_business_account","entry":[] }"#;
        assert_eq!(
            sign_meta(b"test_app_secret", spaced),
            "sha256=5a0d58f92a61e73bf7668a44b5078b4c2921c6c32d5701612fbcea8aae5a830b"
        );
        assert_eq!(verify_meta(b"test_app_secret", spaced, Some(good)), Err(Rejection::Mismatch));
        assert_eq!(verify_meta(b"other_secret", BODY, Some(good)), Err(Rejection::Mismatch));
        assert_eq!(verify_meta(b"test_app_secret", BODY, None), Err(Rejection::Missing));
        for bad in [
            &b"dec6a680"[..],
            b"sha256=",
            b"sha256=zz",
            b"sha1=dec6a680679a968e7e0319355b23599cbfc54502c0784668e9618baa0c633756",
            b"sha256=dec6a680679a968e7e0319355b23599cbfc54502c0784668e9618baa0c63375",
        ] {
            assert_eq!(
                verify_meta(b"test_app_secret", BODY, Some(bad)),
                Err(Rejection::Malformed),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn shared_secrets_compare_whole() {
        assert!(secrets_match(b"s3cret", b"s3cret"));
        assert!(!secrets_match(b"s3cret", b"s3cre"));
        assert!(!secrets_match(b"s3cret", b"s3cret "));
        assert!(!secrets_match(b"", b""), "an empty secret never authenticates");
    }

    #[test]
    fn base64url_round_trips() {
        for len in 0..40 {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            assert_eq!(base64url_decode(base64url_encode(&data).as_bytes()), Some(data));
        }
        assert_eq!(base64url_encode(b"hello"), "aGVsbG8");
        assert_eq!(base64url_decode(b"aGVsbG8="), Some(b"hello".to_vec()));
        assert_eq!(base64url_decode(b"a"), None);
        assert_eq!(base64url_decode(b"a+b/"), None);
    }

    #[test]
    fn evolution_jwt() {
        let now = Utc::now();
        let token = format!("Bearer {}", sign_evolution_jwt(b"jwt-key", now));
        assert_eq!(verify_evolution_jwt(b"jwt-key", token.as_bytes(), now), Ok(()));
        assert_eq!(verify_evolution_jwt(b"other", token.as_bytes(), now), Err(Rejection::Mismatch));
        let later = now + chrono::Duration::seconds(600 + 61);
        assert_eq!(verify_evolution_jwt(b"jwt-key", token.as_bytes(), later), Err(Rejection::Expired));
        let early = now - chrono::Duration::seconds(120);
        assert_eq!(verify_evolution_jwt(b"jwt-key", token.as_bytes(), early), Err(Rejection::Expired));
        // a token whose header says "none" is refused whatever its signature
        let none_header = base64url_encode(br#"{"alg":"none"}"#);
        let parts: Vec<&str> = token.trim_start_matches("Bearer ").split('.').collect();
        let forged = format!("Bearer {none_header}.{}.", parts[1]);
        assert_eq!(verify_evolution_jwt(b"jwt-key", forged.as_bytes(), now), Err(Rejection::Malformed));
        for bad in ["Bearer", "Bearer a.b", "Basic abc", "Bearer a.b.c.d", "Bearer ...."] {
            assert!(verify_evolution_jwt(b"jwt-key", bad.as_bytes(), now).is_err(), "{bad}");
        }
    }
}
