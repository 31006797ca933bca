//! The simulator's dice: which fault a send meets, how long it takes, which statuses
//! follow an accepted message and when, and what ids look like.
//!
//! Pure functions of the configuration and a random source, so tests pin them with a
//! seeded generator; the handlers do the sleeping and the I/O.

use std::time::Duration;

use rand::Rng;
use rand::distr::{Alphanumeric, SampleString};

use super::config::{Faults, Latency, WebhookBehaviour};

/// An injected send error, named by its Meta meaning; each provider answers it in its
/// own wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// Transient server error.
    Retryable,
    /// Channel throughput limit.
    RateLimit,
    /// Pair rate limit.
    PairRate,
    /// Permanent refusal of the message.
    Permanent,
    /// A specific Meta code.
    Code(i64),
}

/// The fault for one request, from a uniform draw in [0, 1): the classes and codes
/// cover consecutive slices of the unit interval, the rest means no fault.
pub(crate) fn choose_fault(faults: &Faults, draw: f64) -> Option<Fault> {
    let classes = [
        (Fault::Retryable, faults.retryable),
        (Fault::RateLimit, faults.rate_limit),
        (Fault::PairRate, faults.pair_rate),
        (Fault::Permanent, faults.permanent),
    ];
    let codes = faults.codes.iter().map(|(code, p)| (Fault::Code(*code), *p));
    let mut edge = 0.0;
    for (fault, p) in classes.into_iter().chain(codes) {
        edge += p;
        if draw < edge {
            return Some(fault);
        }
    }
    None
}

/// Whether an accepted message's answer is replaced by a gateway's 504: its recipient
/// (digits) is listed, or the uniform `draw` in [0, 1) falls under the probability.
pub fn behind_gateway(faults: &Faults, recipient_digits: &str, draw: f64) -> bool {
    draw < faults.gateway_timeout || faults.gateway_timeout_recipients.iter().any(|n| digits(n) == recipient_digits)
}

/// A duration uniform in `[min_ms, max_ms]`.
pub fn between(rng: &mut impl Rng, min_ms: u64, max_ms: u64) -> Duration {
    Duration::from_millis(if max_ms > min_ms { rng.random_range(min_ms..=max_ms) } else { min_ms })
}

/// How long one send takes to answer.
pub fn latency(rng: &mut impl Rng, latency: &Latency) -> Duration {
    between(rng, latency.min_ms, latency.max_ms)
}

/// Whether an event of probability `p` happens.
pub(crate) fn chance(rng: &mut impl Rng, p: f64) -> bool {
    p > 0.0 && rng.random::<f64>() < p
}

/// A message status the simulator reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// On WhatsApp's servers (Meta `sent`, Evolution `SERVER_ACK`).
    Sent,
    /// On the recipient's device (`delivered`, `DELIVERY_ACK`).
    Delivered,
    /// Read (`read`, `READ`).
    Read,
    /// Not deliverable, with the Meta code (`failed`, `ERROR`).
    Failed(i64),
}

/// One webhook POST: when (after acceptance) and which statuses it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Post {
    /// Delay after the message was accepted.
    pub after: Duration,
    /// Statuses in the body, in body order (Meta may batch; Evolution posts one each).
    pub statuses: Vec<Status>,
}

/// Whether the provider can put several statuses in one body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Batching {
    /// Meta: `statuses[]` is an array.
    Allowed,
    /// Evolution: one event per POST.
    Never,
}

/// The webhooks that follow one accepted message. `fails_with` is a failure Meta
/// decides after accepting (131026 for a number not on WhatsApp, 131049 for the
/// per-user marketing limit): a single `failed` with that code, as Meta sends it.
pub fn plan(
    rng: &mut impl Rng,
    behaviour: &WebhookBehaviour,
    fails_with: Option<i64>,
    batching: Batching,
) -> Vec<Post> {
    let statuses = if let Some(code) = fails_with {
        vec![Status::Failed(code)]
    } else if chance(rng, behaviour.failed) {
        vec![Status::Failed(behaviour.failure_code)]
    } else {
        let mut s = vec![Status::Sent];
        if chance(rng, behaviour.delivered) {
            s.push(Status::Delivered);
            if chance(rng, behaviour.read) {
                s.push(Status::Read);
            }
        }
        s
    };
    let step = |rng: &mut _| between(rng, behaviour.delay_min_ms, behaviour.delay_max_ms);
    let mut at = Duration::ZERO;
    let mut posts: Vec<Post> = statuses
        .into_iter()
        .map(|status| {
            at += step(rng);
            Post { after: at, statuses: vec![status] }
        })
        .collect();

    // Delivered and read at nearly the same time: one body, read first (as in A5.5).
    if batching == Batching::Allowed
        && posts.len() >= 2
        && chance(rng, behaviour.batch)
        && let Some(last) = posts.pop()
        && let Some(previous) = posts.last_mut()
    {
        previous.after = last.after;
        let mut merged = last.statuses;
        merged.append(&mut previous.statuses);
        previous.statuses = merged;
    }
    // Two consecutive posts swap arrival times.
    if posts.len() >= 2 && chance(rng, behaviour.out_of_order) {
        let i = rng.random_range(0..posts.len() - 1);
        let (first, second) = (posts[i].after, posts[i + 1].after);
        posts[i].after = second;
        posts[i + 1].after = first;
    }
    // A post delivered twice, the second copy a little later.
    if !posts.is_empty() && chance(rng, behaviour.duplicate) {
        let i = rng.random_range(0..posts.len());
        let mut copy = posts[i].clone();
        copy.after += step(rng);
        posts.push(copy);
    }
    posts.sort_by_key(|p| p.after);
    posts
}

/// A Meta message id: `wamid.` and base64-looking characters, as long as real ones.
pub fn wamid(rng: &mut impl Rng) -> String {
    format!("wamid.HBgM{}AA==", Alphanumeric.sample_string(rng, 48))
}

/// An Evolution (Baileys web) message id: `3EB0` and 18 hex digits.
pub(crate) fn evolution_key_id(rng: &mut impl Rng) -> String {
    format!("3EB0{:018X}", rng.random::<u128>() & ((1u128 << 72) - 1))
}

/// Evolution's database row id (`messageId`), cuid-like.
pub(crate) fn evolution_row_id(rng: &mut impl Rng) -> String {
    format!("cm{}", Alphanumeric.sample_string(rng, 23).to_ascii_lowercase())
}

/// Meta's `fbtrace_id`.
pub(crate) fn fbtrace_id(rng: &mut impl Rng) -> String {
    Alphanumeric.sample_string(rng, 23)
}

/// The digits of a recipient as either API receives it (`+55 11 9...`, a JID): digits
/// only, the JID's domain dropped.
pub(crate) fn digits(number: &str) -> String {
    let user = number.split('@').next().unwrap_or(number);
    user.chars().filter(char::is_ascii_digit).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use std::collections::BTreeMap;

    #[test]
    fn faults_take_consecutive_slices_of_the_draw() {
        let faults = Faults {
            retryable: 0.1,
            rate_limit: 0.1,
            pair_rate: 0.1,
            permanent: 0.1,
            codes: BTreeMap::from([(131049, 0.1)]),
            ..Faults::default()
        };
        let cases = [
            (0.05, Some(Fault::Retryable)),
            (0.15, Some(Fault::RateLimit)),
            (0.25, Some(Fault::PairRate)),
            (0.35, Some(Fault::Permanent)),
            (0.45, Some(Fault::Code(131049))),
            (0.55, None),
            (0.99, None),
        ];
        for (draw, expected) in cases {
            assert_eq!(choose_fault(&faults, draw), expected, "draw {draw}");
        }
        assert_eq!(choose_fault(&Faults::default(), 0.0), None);
    }

    #[test]
    fn gateway_timeouts_by_probability_or_recipient() {
        let faults = Faults {
            gateway_timeout: 0.25,
            gateway_timeout_recipients: vec!["+55 11 90000-0001".into()],
            ..Faults::default()
        };
        assert!(behind_gateway(&faults, "15551234567", 0.1));
        assert!(!behind_gateway(&faults, "15551234567", 0.3));
        assert!(behind_gateway(&faults, "5511900000001", 0.99));
        assert!(!behind_gateway(&Faults::default(), "5511900000001", 0.0));
    }

    fn quiet() -> WebhookBehaviour {
        WebhookBehaviour {
            failed: 0.0,
            delivered: 1.0,
            read: 1.0,
            duplicate: 0.0,
            out_of_order: 0.0,
            batch: 0.0,
            delay_min_ms: 10,
            delay_max_ms: 10,
            ..WebhookBehaviour::default()
        }
    }

    #[test]
    fn a_happy_message_is_sent_delivered_read_in_order() {
        let mut rng = StdRng::seed_from_u64(7);
        let posts = plan(&mut rng, &quiet(), None, Batching::Allowed);
        let statuses: Vec<_> = posts.iter().map(|p| p.statuses.clone()).collect();
        assert_eq!(statuses, vec![vec![Status::Sent], vec![Status::Delivered], vec![Status::Read]]);
        let times: Vec<u64> = posts.iter().map(|p| p.after.as_millis() as u64).collect();
        assert_eq!(times, vec![10, 20, 30]);
    }

    #[test]
    fn undeliverable_numbers_only_fail() {
        let mut rng = StdRng::seed_from_u64(7);
        let posts = plan(&mut rng, &quiet(), Some(131026), Batching::Allowed);
        assert_eq!(posts, vec![Post { after: Duration::from_millis(10), statuses: vec![Status::Failed(131026)] }]);
    }

    #[test]
    fn batching_merges_the_last_two_statuses_read_first() {
        let mut rng = StdRng::seed_from_u64(7);
        let posts = plan(&mut rng, &WebhookBehaviour { batch: 1.0, ..quiet() }, None, Batching::Allowed);
        assert_eq!(posts.len(), 2);
        assert_eq!(posts[1].statuses, vec![Status::Read, Status::Delivered]);
        let posts = plan(&mut rng, &WebhookBehaviour { batch: 1.0, ..quiet() }, None, Batching::Never);
        assert_eq!(posts.len(), 3);
    }

    #[test]
    fn duplicates_and_reordering_keep_every_status() {
        let mut rng = StdRng::seed_from_u64(11);
        let behaviour =
            WebhookBehaviour { duplicate: 1.0, out_of_order: 1.0, delay_min_ms: 10, delay_max_ms: 50, ..quiet() };
        for _ in 0..50 {
            let posts = plan(&mut rng, &behaviour, None, Batching::Never);
            assert_eq!(posts.len(), 4);
            let mut seen: Vec<Status> = posts.iter().flat_map(|p| p.statuses.clone()).collect();
            seen.dedup();
            for status in [Status::Sent, Status::Delivered, Status::Read] {
                assert!(seen.contains(&status));
            }
            assert!(posts.windows(2).all(|w| w[0].after <= w[1].after));
        }
    }

    #[test]
    fn ids_look_like_the_real_ones() {
        let mut rng = StdRng::seed_from_u64(1);
        let id = wamid(&mut rng);
        assert!(id.starts_with("wamid.") && id.len() > 50 && id.len() <= 128);
        let key = evolution_key_id(&mut rng);
        assert!(key.starts_with("3EB0") && key.len() == 22 && key.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(digits("+55 (11) 99999-9999"), "5511999999999");
        assert_eq!(digits("5511999999999@s.whatsapp.net"), "5511999999999");
    }
}
