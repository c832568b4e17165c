//! Test-only crash points: named moments (mid-append, between a send and
//! its mark, before COMMIT) at which the crash test kills the daemon with
//! SIGKILL, so every risky window is hit on purpose rather than by luck.
//!
//! Only debug builds read `RUNHOOK_CRASH_AT=<name>[:<nth>]` (the `nth` time
//! the named point is reached, 1 by default); release builds compile every
//! point to nothing.

/// Kills the process with SIGKILL if `name` is the armed point and this is
/// its `nth` hit.
#[inline(always)]
pub fn hit(name: &str) {
    if armed(name) {
        die();
    }
}

/// Whether the armed point `name` is reached for the `nth` time now: the
/// caller does its partial work (half a write), then calls [`die`].
#[cfg(debug_assertions)]
pub fn armed(name: &str) -> bool {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static ARMED: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);
    let armed = ARMED.get_or_init(|| parse(&std::env::var("RUNHOOK_CRASH_AT").ok()?));
    match armed {
        Some((point, nth)) if point == name => HITS.fetch_add(1, Ordering::SeqCst) + 1 == *nth,
        _ => false,
    }
}

#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn armed(_name: &str) -> bool {
    false
}

/// `name[:nth]`.
#[cfg(debug_assertions)]
fn parse(spec: &str) -> Option<(String, u64)> {
    let (name, nth) = match spec.split_once(':') {
        Some((name, nth)) => (name, nth.parse().ok()?),
        None => (spec, 1),
    };
    (!name.is_empty()).then(|| (name.to_owned(), nth))
}

/// SIGKILL to this process: no destructor, flush or unwinding runs.
pub fn die() -> ! {
    eprintln!("runhook: crash point reached; killing myself");
    // SAFETY: kill(2) and getpid(2) have no memory-safety preconditions.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    // SIGKILL cannot be caught; this is never reached.
    std::process::abort()
}

#[cfg(all(test, debug_assertions))]
mod tests {
    use super::*;

    #[test]
    fn a_point_is_named_with_an_optional_count() {
        assert_eq!(
            parse("file.mid_append"),
            Some(("file.mid_append".into(), 1))
        );
        assert_eq!(
            parse("store.before_commit:7"),
            Some(("store.before_commit".into(), 7))
        );
        assert_eq!(parse("x:seven"), None);
        assert_eq!(parse(""), None);
    }
}
