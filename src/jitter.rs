//! The daemon's randomness (backoff jitter, start-up spread) from one place,
//! so a test can replay it: debug builds seed it from `RUNHOOK_SEED`; release
//! builds, and debug builds without it, use the thread-local generator.

use rand::RngExt;
use rand::distr::uniform::{SampleRange, SampleUniform};

/// A value drawn uniformly from `range`.
pub fn random_range<T, R>(range: R) -> T
where
    T: SampleUniform,
    R: SampleRange<T>,
{
    #[cfg(debug_assertions)]
    if let Some(seeded) = seeded() {
        return seeded
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .random_range(range);
    }
    rand::rng().random_range(range)
}

#[cfg(debug_assertions)]
fn seeded() -> Option<&'static std::sync::Mutex<rand::rngs::StdRng>> {
    use rand::SeedableRng;
    static SEEDED: std::sync::OnceLock<Option<std::sync::Mutex<rand::rngs::StdRng>>> =
        std::sync::OnceLock::new();
    SEEDED
        .get_or_init(|| {
            let seed: u64 = std::env::var("RUNHOOK_SEED").ok()?.parse().ok()?;
            Some(std::sync::Mutex::new(rand::rngs::StdRng::seed_from_u64(
                seed,
            )))
        })
        .as_ref()
}
