//! The operator's allocator: jemalloc, with the settings in [`SETTINGS`], chosen by measurement
//! (BENCHMARKS.md, "the allocator"), not habit.
//!
//! The same operator in the bench (BENCHMARKS.md), glibc's malloc (one arena, freed pages
//! trimmed every 10 s) against jemalloc with these settings: 10,000 clients after the idle
//! window 50.4 against 47.8 MiB (the goal is 48); 1,000 clients after the window 15.5 against
//! 16.7, after a refresh storm 18.5 against 17.0, and after another 30 s idle 17.5 against
//! 15.8 (the goal is 20). Most of a replica's heap is tens of thousands of small per-client
//! allocations made over a long start-up between short-lived ones (LIST pages, reconciles):
//! glibc's first-fit heap keeps pages held by a few survivors, where jemalloc's size-class
//! slabs keep like with like. jemalloc's defaults were measured in an earlier session (2 MiB
//! more at 0 clients, more at 1,000), and mimalloc was far worse (per-thread pages).
//!
//! - `narenas:1`: one arena. The operator's work hops between tokio's worker threads; arenas per
//!   thread (per core by default) each keep the holes the others left.
//! - `tcache:false`: no per-thread caches of freed objects; the operator allocates little per
//!   second, and each thread's cache would hold memory of its own.
//! - `dirty_decay_ms:1000,muzzy_decay_ms:0`: freed pages go back to the system within about a
//!   second and at once for good, rather than after ten seconds and lazily (pages freed lazily
//!   still count in RSS until the kernel needs them).
//!
//! `_RJEM_MALLOC_CONF` in the environment overrides any of them at start-up (jemalloc's own
//! variable; `stats_print:true` prints the settings in force at exit).

/// The allocator the binary installs as its global allocator.
#[cfg(not(target_env = "msvc"))]
pub type Allocator = tikv_jemallocator::Jemalloc;

/// jemalloc's settings ([`malloc_conf`]), as a C string.
pub const SETTINGS: &std::ffi::CStr =
    c"narenas:1,tcache:false,dirty_decay_ms:1000,muzzy_decay_ms:0";

/// Read by jemalloc when it starts: its compiled-in settings (the `_rjem_` prefix is how the
/// jemalloc of `tikv-jemallocator` names its symbols). `#[used]` keeps it through link-time
/// optimisation although no Rust code reads it.
#[cfg(not(target_env = "msvc"))]
#[used]
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: Option<&std::ffi::c_char> = {
    // SAFETY: the pointer is to the first byte of a 'static C string literal.
    Some(unsafe { &*SETTINGS.as_ptr() })
};
