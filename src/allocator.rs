//! The allocator setting the operator runs with, chosen by measurement (BENCHMARKS.md, "the
//! allocator"), not habit.
//!
//! glibc's malloc gives threads that meet contention arenas of their own (up to eight per core)
//! and keeps what is freed in each for reuse by that arena. The operator's work hops between
//! tokio's worker threads, so objects freed on one thread leave holes another cannot fill: with
//! one arena the resident heap at 1,000 clients was 1.3–2 MiB (about a tenth) smaller, with no
//! measurable cost in the storm, whose pace is GoTo's. mimalloc was measured too and was far
//! worse (per-thread pages). musl, the container image's libc, has no arenas: nothing is set
//! there. `MALLOC_ARENA_MAX` in the environment wins over this default.
//!
//! glibc also keeps freed pages in the middle of its heap until something asks for them back:
//! after start-up (LIST pages, every client's first reconcile) that was 1.5 MiB of 15 at 1,000
//! clients. [`give_back`] asks every [`TRIM_INTERVAL`]; a trim of a heap this size takes well
//! under a millisecond.

use std::time::Duration;

/// How often freed memory is returned to the system.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(10);

/// Limits glibc to one malloc arena unless `MALLOC_ARENA_MAX` says otherwise. Call before any
/// other thread starts.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a malloc parameter; no other thread runs yet, and a value
        // glibc rejects leaves the default in place (the return value says so, and either is
        // fine).
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

/// Returns freed heap pages to the system every [`TRIM_INTERVAL`], for as long as it runs.
pub async fn give_back() {
    let mut every = tokio::time::interval(TRIM_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        trim();
    }
}

/// Returns freed heap pages to the system, where the allocator can.
fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; it locks each arena it trims.
    unsafe {
        libc::malloc_trim(0);
    }
}
