//! Watch streams: replay from the bounded history (or synthetic ADDED events), then live events,
//! bookmarks, `timeoutSeconds`, and the 410 `ERROR` event for a too-old resourceVersion.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Body;
use axum::body::Bytes;
use axum::response::Response;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;

use super::Shared;
use super::errors::ApiError;
use super::render;
use super::select::{FieldSelector, LabelSelector};
use super::store::{Record, ResourceDef, Store};

pub(crate) struct WatchParams {
    pub(crate) resource_version: Option<String>,
    pub(crate) bookmarks: bool,
    pub(crate) timeout: Duration,
    pub(crate) send_initial_events: bool,
    pub(crate) metadata_only: bool,
    pub(crate) labels: LabelSelector,
    pub(crate) fields: FieldSelector,
}

struct Filter {
    def: Arc<ResourceDef>,
    metadata_only: bool,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    fn matches(&self, obj: &Value) -> bool {
        self.labels.matches(obj) && self.fields.matches(obj)
    }

    /// The event a watcher sees for `rec`, if any (selector transitions become ADDED/DELETED).
    fn event(&self, rec: &Record) -> Option<String> {
        if rec.storage != self.def.storage {
            return None;
        }
        if let Some(ns) = &self.namespace
            && rec.namespace != *ns
        {
            return None;
        }
        let now = self.matches(&rec.object);
        let etype = match (rec.etype, rec.previous.as_deref().map(|p| self.matches(p))) {
            ("MODIFIED", Some(true)) if !now => "DELETED",
            ("MODIFIED", Some(false)) if now => "ADDED",
            ("MODIFIED", Some(false)) => return None,
            (t, _) if now => t,
            _ => return None,
        };
        Some(self.line(etype, &rec.object))
    }
}

impl Filter {
    fn line(&self, etype: &str, stored: &Value) -> String {
        let obj = if self.metadata_only {
            render::encode(
                &super::partial_of(&self.def, stored),
                render::Order::generic(),
            )
        } else {
            render::encode(&Store::view(&self.def, stored), self.def.order())
        };
        format!("{{\"type\":\"{etype}\",\"object\":{}}}\n", obj.trim_end())
    }

    fn bookmark(&self, rv: u64, initial_end: bool) -> String {
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let obj = if self.metadata_only {
            json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": meta})
        } else {
            json!({"kind": self.def.kind, "apiVersion": self.def.api_version(), "metadata": meta})
        };
        format!(
            "{{\"type\":\"BOOKMARK\",\"object\":{}}}\n",
            render::encode(&obj, self.def.order()).trim_end()
        )
    }
}

/// Decrements the open-watch counter when the stream task ends, however it ends.
struct OpenGuard(Arc<std::sync::atomic::AtomicUsize>);
impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

pub(crate) fn start(
    shared: &Arc<Shared>,
    def: Arc<ResourceDef>,
    namespace: Option<String>,
    p: WatchParams,
) -> Result<Response, ApiError> {
    let filter = Filter {
        def,
        metadata_only: p.metadata_only,
        namespace,
        labels: p.labels,
        fields: p.fields,
    };
    let requested: Option<u64> = match p.resource_version.as_deref() {
        None | Some("") | Some("0") => None,
        Some(rv) => Some(rv.parse().map_err(|_| {
            ApiError::bad_request(format!(
                "invalid resource version: strconv.ParseUint: parsing \"{rv}\": invalid syntax"
            ))
        })?),
    };
    let mut initial = String::new();
    let mut close_now = false;
    let (rx, start_rv) = {
        let store = shared.lock_store();
        let rx = store.tx.subscribe();
        let current = store.rv;
        match requested {
            Some(rv) if !p.send_initial_events => {
                if rv < store.floor {
                    let err = json!({
                        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": format!("too old resource version: {rv} ({})", store.floor),
                        "reason": "Expired", "code": 410,
                    });
                    initial.push_str(&format!(
                        "{{\"type\":\"ERROR\",\"object\":{}}}\n",
                        render::encode(&err, render::Order::generic()).trim_end()
                    ));
                    close_now = true;
                } else {
                    let from = store.history.partition_point(|r| r.rv <= rv);
                    for rec in store.history.range(from..) {
                        if let Some(l) = filter.event(rec) {
                            initial.push_str(&l);
                        }
                    }
                }
                (rx, current.max(rv))
            }
            _ => {
                for (_, obj) in store.iter_objects(&filter.def, filter.namespace.as_deref()) {
                    if filter.matches(obj) {
                        initial.push_str(&filter.line("ADDED", obj));
                    }
                }
                if p.bookmarks && (p.resource_version.is_none() || p.send_initial_events) {
                    initial.push_str(&filter.bookmark(current, true));
                }
                (rx, current)
            }
        }
    };

    let (tx, body_rx) = mpsc::channel::<Bytes>(256);
    shared.open_watches.fetch_add(1, Ordering::SeqCst);
    let guard = OpenGuard(shared.open_watches.clone());
    let cancel = shared.watch_token();
    let timeout = p.timeout;
    let bookmarks = p.bookmarks;
    let watch_list = p.send_initial_events;
    tokio::spawn(async move {
        let _guard = guard;
        if !initial.is_empty() && tx.send(Bytes::from(initial)).await.is_err() {
            return;
        }
        if close_now {
            return;
        }
        run(
            tx, rx, filter, start_rv, timeout, bookmarks, watch_list, cancel,
        )
        .await;
    });
    let stream = futures::stream::unfold(body_rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<Bytes, std::convert::Infallible>(b), rx))
    });
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .header("cache-control", "no-cache, private")
        .body(Body::from_stream(stream))
        .map_err(|e| ApiError::internal(e.to_string()))
}

#[allow(clippy::too_many_arguments)]
async fn run(
    tx: mpsc::Sender<Bytes>,
    mut rx: broadcast::Receiver<Arc<Record>>,
    filter: Filter,
    start_rv: u64,
    timeout: Duration,
    bookmarks: bool,
    watch_list: bool,
    cancel: tokio_util::sync::CancellationToken,
) {
    let started = Instant::now();
    let deadline = started + timeout;
    // Like the real server: one bookmark shortly before the timeout (none for very short watches),
    // and for watch-lists a bookmark shortly after live events, then about one per second.
    let mut before_timeout = (bookmarks && timeout >= Duration::from_secs(4))
        .then(|| deadline - Duration::from_millis(1500));
    let mut periodic: Option<Instant> = None;
    let mut last_rv = start_rv;
    loop {
        let next_bookmark = match (before_timeout, periodic) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let far = deadline + Duration::from_secs(3600);
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break,
            _ = cancel.cancelled() => break,
            _ = tx.closed() => break,
            _ = tokio::time::sleep_until(next_bookmark.unwrap_or(far)), if next_bookmark.is_some() => {
                let now = Instant::now();
                if before_timeout.is_some_and(|t| t <= now) {
                    before_timeout = None;
                }
                if periodic.is_some_and(|t| t <= now) {
                    periodic = Some(now + Duration::from_secs(1));
                }
                if tx.send(Bytes::from(filter.bookmark(last_rv, false))).await.is_err() {
                    break;
                }
            }
            r = rx.recv() => match r {
                Ok(rec) => {
                    if rec.rv <= last_rv {
                        continue;
                    }
                    last_rv = rec.rv;
                    if let Some(l) = filter.event(&rec) {
                        if tx.send(Bytes::from(l)).await.is_err() {
                            break;
                        }
                        if watch_list && bookmarks && periodic.is_none() {
                            periodic = Some(Instant::now() + Duration::from_millis(100));
                        }
                    }
                }
                // A watcher that fell behind is closed; the client re-watches from its last RV.
                Err(_) => break,
            }
        }
    }
}
