//! Every secret text the gateway has held since it started: what every answer is scanned
//! for. An upstream may keep a secret and hand it to any later request (a stored-request
//! inspector, a log page): one of another sandbox behind the same `gateway serve`, or one
//! made after a reload rotated or removed the credential. So the scan cannot be the
//! requesting sandbox's policy's own: it covers every sandbox's secrets and every secret an
//! earlier policy held, and the set only grows, for the life of the process.

use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwapOption;
use bytes::Bytes;

use super::response_scan::Echoes;

/// Shared by every sandbox's tunnel and by whoever puts a policy in force. Cheap to clone.
#[derive(Clone, Default)]
pub struct EchoRegistry(Arc<Registry>);

#[derive(Default)]
struct Registry {
    /// Every text registered, each once. Its `Bytes` share the credentials' buffers, wiped
    /// when the last copy goes, as the credentials' own are. Held while adding, so two
    /// sandboxes reloading at once cannot each drop what the other added.
    texts: Mutex<Vec<Bytes>>,
    /// `texts` ready to scan with, read once per request (one atomic load); `None` while
    /// the gateway has held no secret, and then answers are relayed unread.
    scan: ArcSwapOption<Echoes>,
}

impl EchoRegistry {
    /// What an answer is scanned for, as it is when the request starts.
    pub(super) fn current(&self) -> Option<Echoes> {
        self.0.scan.load().as_deref().cloned()
    }

    /// Adds `texts` to what answers are scanned for; what was there stays.
    pub(super) fn register(&self, texts: &[Bytes]) {
        let mut held = self.0.texts.lock().unwrap_or_else(PoisonError::into_inner);
        let before = held.len();
        for text in texts {
            if !held.contains(text) {
                held.push(text.clone());
            }
        }
        // A reload that keeps every secret (most of them) changes nothing.
        if held.len() > before {
            let all: Arc<[Bytes]> = held.as_slice().into();
            self.0.scan.store(Echoes::new(&all).map(Arc::new));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(t: &[&'static str]) -> Vec<Bytes> {
        t.iter().map(|t| Bytes::from_static(t.as_bytes())).collect()
    }

    #[test]
    fn nothing_is_scanned_for_until_a_secret_is_registered() {
        let registry = EchoRegistry::default();
        assert!(registry.current().is_none());
        registry.register(&[]);
        assert!(registry.current().is_none());
        registry.register(&texts(&["s3cret-a"]));
        assert!(registry.current().unwrap().found_in(b"x s3cret-a x"));
    }

    #[test]
    fn every_sandbox_and_every_retired_secret_stays_scanned_for() {
        let registry = EchoRegistry::default();
        let other_sandbox = registry.clone();
        registry.register(&texts(&["s3cret-a"]));
        other_sandbox.register(&texts(&["s3cret-b"]));
        // A reload that rotates sandbox A's secret: the old one is still looked for.
        registry.register(&texts(&["s3cret-a2"]));
        let scan = other_sandbox.current().unwrap();
        for text in ["s3cret-a", "s3cret-b", "s3cret-a2"] {
            assert!(scan.found_in(format!("..{text}..").as_bytes()), "{text}");
        }
        assert!(!scan.found_in(b"s3cret-c and more"));
    }

    #[test]
    fn a_text_registered_again_is_held_once_and_changes_nothing() {
        let registry = EchoRegistry::default();
        registry.register(&texts(&["s3cret-a", "s3cret-b"]));
        let before = registry.0.scan.load_full().unwrap();
        registry.register(&texts(&["s3cret-b", "s3cret-a"]));
        assert!(Arc::ptr_eq(&before, &registry.0.scan.load_full().unwrap()));
        assert_eq!(registry.0.texts.lock().unwrap().len(), 2);
    }
}
