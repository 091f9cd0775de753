//! Crash points for the crash-recovery tests. With `EXPORT_CRASH_AT=name` (or `name@N`: the Nth
//! time the point is reached) the process kills itself with SIGKILL there, as an OOM kill or a
//! lost machine would. Unset, which is always the case outside those tests, a point costs a load.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

static PLAN: OnceLock<Option<(String, u64)>> = OnceLock::new();
static HITS: AtomicU64 = AtomicU64::new(0);

fn plan() -> &'static Option<(String, u64)> {
    PLAN.get_or_init(|| {
        let value = std::env::var("EXPORT_CRASH_AT").ok()?;
        let (name, nth) = match value.split_once('@') {
            Some((name, nth)) => (name, nth.parse().ok()?),
            None => (value.as_str(), 1),
        };
        Some((name.to_string(), nth))
    })
}

/// Marks a point of the export's life: planned, recorded, claimed, mid-file, committed, done.
pub fn reached(name: &str) {
    let Some((point, nth)) = plan() else {
        return;
    };
    if point != name || HITS.fetch_add(1, Ordering::SeqCst) + 1 != *nth {
        return;
    }
    eprintln!("crash point {name}@{nth}: killing the process");
    crate::os::kill_self();
}
