//! Fuzz targets for every parser of untrusted input, run by `cargo test` (a short run) and, with
//! `GOTO_OAUTH_FUZZ_SECONDS`, for as long as asked (README "Tests", BENCHMARKS.md "Fuzzing").
//!
//! The tool is `proptest` driven by our own time-bounded loop ([`fuzz`]). Only the stable
//! toolchain exists here, which rules out cargo-fuzz/libFuzzer; proptest runs on stable, is
//! well kept, generates *structured* inputs (a signed state with one bit flipped, a JSON object
//! with a wrong type in one field, a spec with garbage in one field) as easily as raw bytes, and
//! shrinks a failing input to a minimal one that becomes a regression test. `bolero`/`arbtest`
//! would give coverage guidance only with nightly sanitizers, which are not available.
//!
//! The targets live inside the crate (not in `tests/`) because most of what they exercise is
//! `pub(crate)`: the router's handlers with a [`Context`](crate::controller::Context), the link
//! index, the DNS-name checks. Each asserts properties, not only "no panic".
//!
//! The long run uses the ordinary test build: its overflow checks and debug assertions make an
//! arithmetic overflow a crash here, even where the release binary would wrap.

mod api;
mod spec;
mod state;
mod stored_secret;
mod token_response;
mod web;

use std::{
    fmt::Debug,
    io::Write as _,
    time::{Duration, Instant},
};

use proptest::{
    strategy::Strategy,
    test_runner::{Config, RngSeed, TestCaseResult, TestError, TestRunner},
};

/// Runs `test` on inputs from `strategy`: `short_cases` of them under plain `cargo test`, or
/// for `GOTO_OAUTH_FUZZ_SECONDS` seconds. `GOTO_OAUTH_FUZZ_SEED` replays a run's inputs. A
/// failure (a panic or a violated property) is shrunk to a minimal input and reported with the
/// seed; the cases run are printed to stderr past libtest's capture.
pub(crate) fn fuzz<S>(
    name: &str,
    short_cases: u64,
    strategy: S,
    test: impl Fn(S::Value) -> TestCaseResult,
) where
    S: Strategy,
    S::Value: Debug,
{
    let seed = std::env::var("GOTO_OAUTH_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    let budget = std::env::var("GOTO_OAUTH_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs);
    let config = Config {
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(seed),
        max_shrink_iters: 20_000,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let started = Instant::now();
    let mut cases: u64 = 0;
    loop {
        let done = match budget {
            Some(budget) => started.elapsed() >= budget,
            None => cases >= short_cases,
        };
        if done {
            break;
        }
        let tree = match strategy.new_tree(&mut runner) {
            Ok(tree) => tree,
            Err(reason) => panic!("fuzz {name}: the strategy gave up: {reason}"),
        };
        match runner.run_one(tree, &test) {
            Ok(_) => cases += 1,
            Err(TestError::Fail(reason, input)) => panic!(
                "fuzz {name}: failed after {cases} cases (GOTO_OAUTH_FUZZ_SEED={seed}): {reason}\n\
                 minimal input: {input:#?}"
            ),
            Err(TestError::Abort(reason)) => {
                panic!("fuzz {name}: aborted after {cases} cases (seed {seed}): {reason}")
            }
        }
    }
    let line = format!(
        "fuzz {name}: {cases} cases in {:.1} s (GOTO_OAUTH_FUZZ_SEED={seed})\n",
        started.elapsed().as_secs_f64()
    );
    // Straight to stderr: libtest captures only the print macros.
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// Every HTML tag the pages may contain, collected from pages rendered with harmless values:
/// a tag outside this set in a fuzzed page is markup that came from the input.
pub(crate) fn page_tags_allowed() -> &'static std::collections::BTreeSet<String> {
    use crate::web::pages::{ErrorPage, SuccessPage, error_page, success_page};
    static TAGS: std::sync::OnceLock<std::collections::BTreeSet<String>> =
        std::sync::OnceLock::new();
    TAGS.get_or_init(|| {
        let full = error_page(&ErrorPage {
            title: "t",
            what_happened: "w",
            what_to_do: "d",
            application: Some("a"),
            namespace: Some("n"),
            name: Some("m"),
            reference: Some("r"),
        });
        let success = success_page(&SuccessPage {
            application: "a",
            namespace: "n",
            name: "m",
            client_id: "c",
            account: Some("x"),
            access_token_expires_at: Some("2030-01-01T00:00:00Z"),
            secret_name: "s",
        });
        tags(&full)
            .chain(tags(&success))
            .map(str::to_string)
            .collect()
    })
}

/// The `<…>` tags of an HTML text (the stylesheet has no `<`).
pub(crate) fn tags(html: &str) -> impl Iterator<Item = &str> {
    html.match_indices('<').map(|(start, _)| {
        let end = html[start..]
            .find('>')
            .map_or(html.len(), |e| start + e + 1);
        &html[start..end]
    })
}

/// Checks a page: bounded, and no markup but the pages' own.
pub(crate) fn check_page(body: &str, max_len: usize) -> TestCaseResult {
    proptest::prop_assert!(body.len() <= max_len, "page of {} bytes", body.len());
    let allowed = page_tags_allowed();
    for tag in tags(body) {
        proptest::prop_assert!(allowed.contains(tag), "foreign markup {tag:?} in the page");
    }
    Ok(())
}

#[test]
fn the_tag_check_catches_unescaped_markup() {
    let allowed = page_tags_allowed();
    assert!(
        allowed.contains("<p>") && allowed.contains("<h2>"),
        "{allowed:?}"
    );
    assert!(check_page("<p>fine &lt;script&gt;</p>", 100).is_ok());
    assert!(check_page("<p><script>x</script></p>", 100).is_err());
    assert!(check_page("<p>a <b</p>", 100).is_err());
    assert!(check_page(&"x".repeat(101), 100).is_err());
}
