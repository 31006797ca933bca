//! Meta's webhook signature, `X-Hub-Signature-256: sha256=<hex>` (docs/providers.md A4).
//!
//! Here rather than in the webhook service because two sides need the same bytes: the
//! sandbox signs what it posts, the webhook service verifies what it receives.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// The header Meta signs its webhooks in.
pub(crate) const META_SIGNATURE_HEADER: &str = "x-hub-signature-256";

const PREFIX: &str = "sha256=";

/// The `X-Hub-Signature-256` value for a body: `sha256=` and the lowercase hex
/// HMAC-SHA256 of the raw bytes keyed with the app secret. Hash the exact bytes sent;
/// re-serialised JSON would hash differently.
pub(crate) fn meta_signature(app_secret: &[u8], body: &[u8]) -> String {
    format!("{PREFIX}{}", hex::encode(digest(app_secret, body)))
}

/// Whether `header` is a valid signature of `body`. Compares in constant time so a
/// forger learns nothing from response timing; a missing prefix or bad hex is invalid.
pub fn verify_meta_signature(app_secret: &[u8], body: &[u8], header: &str) -> bool {
    let Some(hex_part) = header.trim().strip_prefix(PREFIX) else {
        return false;
    };
    let Ok(given) = hex::decode(hex_part) else {
        return false;
    };
    let expected = digest(app_secret, body);
    given.len() == expected.len() && bool::from(given.ct_eq(&expected))
}

fn digest(key: &[u8], body: &[u8]) -> Vec<u8> {
    // HMAC accepts keys of any length: `new_from_slice` cannot fail for it.
    match Hmac::<Sha256>::new_from_slice(key) {
        Ok(mut mac) => {
            mac.update(body);
            mac.finalize().into_bytes().to_vec()
        }
        Err(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &[u8] = br#"{"object":"whatsapp_business_account","entry":[]}"#;

    #[test]
    fn matches_the_test_vector_of_providers_md() {
        assert_eq!(
            meta_signature(b"test_app_secret", BODY),
            "sha256=dec6a680679a968e7e0319355b23599cbfc54502c0784668e9618baa0c633756"
        );
        let spaced = br#"{"object":"whatsapp_business_account","entry":[] }"#;
        assert_eq!(
            meta_signature(b"test_app_secret", spaced),
            "sha256=5a0d58f92a61e73bf7668a44b5078b4c2921c6c32d5701612fbcea8aae5a830b"
        );
    }

    #[test]
    fn verifies_only_the_right_signature() {
        let good = "sha256=dec6a680679a968e7e0319355b23599cbfc54502c0784668e9618baa0c633756";
        assert!(verify_meta_signature(b"test_app_secret", BODY, good));
        assert!(!verify_meta_signature(b"other_secret", BODY, good));
        assert!(!verify_meta_signature(b"test_app_secret", b"{}", good));
        assert!(!verify_meta_signature(b"test_app_secret", BODY, &good["sha256=".len()..]));
        assert!(!verify_meta_signature(b"test_app_secret", BODY, "sha256=zz"));
        assert!(!verify_meta_signature(b"test_app_secret", BODY, "sha256=dec6"));
    }
}
