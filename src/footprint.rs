//! Where a replica's memory goes per client: every in-memory store, filled with 1,000 clients
//! as the operator fills it, measured in bytes allocated by the test's own thread (a counting
//! global allocator, so the figures are exact and repeatable, unlike RSS). The clients are
//! realistic: an authorized client with GoTo-sized tokens (JWTs of about 1,200 characters), the
//! status the controller writes, and per client two Secrets of its own and two unrelated ones.
//!
//! `cargo test --lib footprint -- --nocapture` prints the table (BENCHMARKS.md shows it); the
//! test fails when a store grows past its budget (about a third above its size now), so a
//! change that makes a store noticeably larger is seen.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    sync::Arc,
    time::Duration,
};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    core::{ObjectMeta, PartialObjectMeta},
    runtime::{reflector, watcher},
};
use secrecy::SecretString;

use crate::{
    clock::Clock,
    consent::index::LinkIndex,
    controller::{
        alarms::Alarms,
        cached::{CachedClient, cache_event},
        fixtures::{demo_client, settings},
        index::{References, SecretVersions},
        memory::{HeldTokens, Memory, ReadValue, Seen},
        plan::Plan,
        status::desired_status,
    },
    goto::TokenResponse,
    metrics::Metrics,
    resource::GoToOAuthClient,
    secret::StoredTokens,
    validation::Defaults,
};

/// Counts the bytes each thread has allocated and not freed.
struct Counting;

thread_local! {
    static NET: Cell<isize> = const { Cell::new(0) };
    static CHUNKS: Cell<isize> = const { Cell::new(0) };
    static LIVE: Cell<isize> = const { Cell::new(0) };
}

/// What glibc's malloc takes for `size` bytes: an 8-byte header, rounded up to 16, at least 32.
fn chunk(size: usize) -> isize {
    ((size + 8).div_ceil(16) * 16).max(32) as isize
}

fn count(delta: isize) {
    // During thread teardown the counter may be gone; nothing is measured then.
    let _ = NET.try_with(|n| n.set(n.get() + delta));
}

fn count_chunk(old: Option<usize>, new: Option<usize>) {
    let delta = new.map_or(0, chunk) - old.map_or(0, chunk);
    let live = isize::from(new.is_some()) - isize::from(old.is_some());
    let _ = CHUNKS.try_with(|n| n.set(n.get() + delta));
    let _ = LIVE.try_with(|n| n.set(n.get() + live));
}

// SAFETY: every call is forwarded to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as isize);
        count_chunk(None, Some(layout.size()));
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-(layout.size() as isize));
        count_chunk(Some(layout.size()), None);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size as isize - layout.size() as isize);
        count_chunk(Some(layout.size()), Some(new_size));
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The bytes `fill` leaves allocated (what it returns is kept until measured).
fn retained<T>(fill: impl FnOnce() -> T) -> (T, Kept) {
    let read = || [&NET, &CHUNKS, &LIVE].map(|counter| counter.with(Cell::get));
    let before = read();
    let kept = fill();
    let after = read();
    let [bytes, chunks, allocations] =
        [0, 1, 2].map(|i| usize::try_from(after[i] - before[i]).unwrap_or_default());
    (
        kept,
        Kept {
            bytes,
            chunks,
            allocations,
        },
    )
}

/// What a store keeps: bytes asked for, bytes of malloc chunks (what RSS sees of them), and
/// the number of allocations.
#[derive(Clone, Copy)]
struct Kept {
    bytes: usize,
    chunks: usize,
    allocations: usize,
}

const CLIENTS: usize = 1000;

/// A JWT of GoTo's size (about 1,200 characters): header, a 598-byte payload and an RS512
/// signature of 256 bytes, each base64url-encoded.
fn jwt(seed: usize) -> String {
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
    let header = URL_SAFE_NO_PAD.encode(br#"{"kid":"oauthv2.lmi.com.0219","alg":"RS512"}"#);
    let mut payload =
        format!(r#"{{"sc":"identity: call-control.v1.calls.control","sub":"{seed:08}","#);
    payload.extend(std::iter::repeat_n('x', 598 - payload.len() - 2));
    payload.push_str(r#""}"#);
    let mut state = seed as u64 + 1;
    let signature: Vec<u8> = (0..256)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 56) as u8
        })
        .collect();
    format!(
        "{header}.{}.{}",
        URL_SAFE_NO_PAD.encode(payload),
        URL_SAFE_NO_PAD.encode(signature)
    )
}

fn tokens(i: usize) -> StoredTokens {
    let response = TokenResponse {
        access_token: SecretString::from(jwt(i)),
        refresh_token: Some(SecretString::from(jwt(i + CLIENTS))),
        token_type: Some("Bearer".into()),
        expires_in: Some(3600),
        scope: Some("identity: call-control.v1.calls.control".into()),
        principal: Some(format!("admin{i}@example.com")),
        email: None,
        account_key: Some(format!("{:019}", 4_000_000_000_000_000_000u64 + i as u64)),
        organizer_key: Some(format!("{:019}", 5_000_000_000_000_000_000u64 + i as u64)),
        account_type: None,
        first_name: None,
        last_name: None,
    };
    let at: Timestamp = "2026-12-02T10:00:00Z".parse().unwrap();
    StoredTokens::from_response(&response, None, &settings(), at).unwrap()
}

/// The operator-wide defaults of a deployment against GoTo.
fn defaults() -> Defaults {
    Defaults {
        public_url: "https://goto-oauth.example.com".parse().unwrap(),
        authorize_url: "https://authentication.logmeininc.com/oauth/authorize"
            .parse()
            .unwrap(),
        token_url: "https://authentication.logmeininc.com/oauth/token"
            .parse()
            .unwrap(),
        allowed_hosts: Vec::new(),
    }
}

/// Client `i` as the controller's cache holds it: authorized, with the status it writes.
fn client(i: usize) -> GoToOAuthClient {
    let (mut obj, mut keys) = demo_client();
    let name = format!("client-{i:05}");
    obj.metadata.name = Some(name.clone());
    obj.metadata.uid = Some(format!("6f1c2a4e-0b7d-4c1e-9a3f-{i:012}"));
    obj.metadata.resource_version = Some(format!("{}", 100_000 + i));
    obj.metadata.generation = Some(1);
    obj.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        "2026-12-01T10:00:00Z".parse().unwrap(),
    ));
    obj.spec.client_id = "0f0e8c7a-6c3d-4d1e-9a51-3c2b1a0f9e8d".into();
    obj.spec.client_secret_ref.name = format!("{name}-credentials");
    keys.name = name;
    keys.uid = obj.metadata.uid.clone().unwrap_or_default();
    let defaults = defaults();
    let plan = Plan::after_consent(&obj, &settings(), tokens(i), &keys.uid);
    let link = "Zx7Qm2Lr8Tn4Vb6Wc9Yd1Ke3Hf5Jg0Pa7Sb2Uc4Xd6Ze";
    let now: Timestamp = "2026-12-02T10:00:00Z".parse().unwrap();
    obj.status = Some(desired_status(
        &obj,
        &keys,
        &plan,
        Some(link),
        &defaults,
        now,
    ));
    obj.trim_for_cache();
    obj
}

fn secret_meta(namespace: &str, name: String, rv: usize) -> PartialObjectMeta<Secret> {
    PartialObjectMeta {
        metadata: ObjectMeta {
            namespace: Some(namespace.into()),
            name: Some(name),
            resource_version: Some(rv.to_string()),
            ..ObjectMeta::default()
        },
        ..PartialObjectMeta::default()
    }
}

#[test]
fn footprint_per_client() {
    let clients: Vec<GoToOAuthClient> = (0..CLIENTS).map(client).collect();
    let per_client = |kept: Kept| Kept {
        bytes: kept.bytes / CLIENTS,
        chunks: kept.chunks / CLIENTS,
        allocations: kept.allocations / CLIENTS,
    };
    let mut rows: Vec<(&str, Kept, usize)> = Vec::new();

    let (_store, bytes) = retained(|| {
        let (store, mut writer) = reflector::store::<CachedClient>();
        for c in &clients {
            writer.apply_watcher_event(&cache_event(watcher::Event::Apply(c.clone())));
        }
        store
    });
    rows.push(("controller's client cache", per_client(bytes), 1280));

    let (_links, bytes) = retained(|| {
        let links = LinkIndex::new(defaults());
        clients.iter().for_each(|c| links.apply(c));
        links
    });
    rows.push(("link index (every replica)", per_client(bytes), 416));

    let (_metrics, bytes) = retained(|| {
        let metrics = Metrics::new(Clock::system());
        clients.iter().for_each(|c| metrics.observe(c));
        metrics
    });
    rows.push(("per-client metric series", per_client(bytes), 320));

    let (_memory, bytes) = retained(|| {
        let memory = Memory::default();
        for (i, c) in clients.iter().enumerate() {
            let uid = c.metadata.uid.clone().unwrap_or_default();
            memory.with(&uid, |m| {
                m.owner = Some(crate::resource::client_key(
                    "ns",
                    c.metadata.name.as_deref().unwrap_or_default(),
                ));
                m.held = Some(HeldTokens::written(&tokens(i), Some("200000".into()), 1));
                m.client_secret = Some(ReadValue {
                    source: ReadValue::source(&c.spec.client_secret_ref.name, "clientSecret"),
                    resource_version: Some("300000".into()),
                    value: Some(SecretString::from("x".repeat(40))),
                    seen: Seen::now(1),
                });
            });
        }
        memory
    });
    rows.push((
        "memory: held tokens, client secret",
        per_client(bytes),
        2048,
    ));

    let (_alarms, bytes) = retained(|| {
        let alarms = Arc::new(Alarms::default());
        // A running scope, as the controller registers it.
        let ringing = alarms.ringing(None);
        for (i, c) in clients.iter().enumerate() {
            let name = c.metadata.name.as_deref().unwrap_or_default();
            alarms.set("ns", name, Some(Duration::from_secs(1800 + i as u64)));
        }
        (alarms, ringing)
    });
    rows.push(("refresh alarms", per_client(bytes), 256));

    let (_versions, bytes) = retained(|| {
        let versions = SecretVersions::default();
        versions.follow(None, &watcher::Event::<PartialObjectMeta<Secret>>::Init);
        for (i, c) in clients.iter().enumerate() {
            let name = c.metadata.name.clone().unwrap_or_default();
            for (j, secret) in [
                format!("{name}-token"),
                format!("{name}-credentials"),
                format!("unrelated-{i:05}-a"),
                format!("unrelated-{i:05}-b"),
            ]
            .into_iter()
            .enumerate()
            {
                versions.follow(
                    None,
                    &watcher::Event::InitApply(secret_meta("ns", secret, 400_000 + 4 * i + j)),
                );
            }
        }
        versions.follow(None, &watcher::Event::<PartialObjectMeta<Secret>>::InitDone);
        versions
    });
    rows.push((
        "Secret versions (4 Secrets a client)",
        per_client(bytes),
        192,
    ));

    let (_references, bytes) = retained(|| {
        let references = References::default();
        clients
            .iter()
            .for_each(|c| references.follow(None, &watcher::Event::Apply(c.clone())));
        references
    });
    rows.push(("Secret references", per_client(bytes), 512));

    let total =
        |field: fn(&Kept) -> usize| -> usize { rows.iter().map(|(_, k, _)| field(k)).sum() };
    println!(
        "bytes per client, {CLIENTS} clients (asked for, in glibc malloc chunks, allocations):"
    );
    for (what, kept, _) in &rows {
        println!(
            "  {what:<40} {:>6} {:>6} {:>4}",
            kept.bytes, kept.chunks, kept.allocations
        );
    }
    println!(
        "  {:<40} {:>6} {:>6} {:>4}",
        "total",
        total(|k| k.bytes),
        total(|k| k.chunks),
        total(|k| k.allocations)
    );
    let sample = Arc::new(clients[0].clone());
    println!(
        "  (one cached client serializes to {} bytes of JSON; its spec and status take {} in the cache)",
        serde_json::to_string(sample.as_ref()).map_or(0, |s| s.len()),
        CachedClient::new(clients[0].clone()).body_len()
    );
    for (what, Kept { bytes, .. }, budget) in rows {
        assert!(
            bytes <= budget,
            "{what}: {bytes} bytes a client, budget {budget}"
        );
    }
}
