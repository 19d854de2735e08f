//! The HTTP server of both listeners, bounded because every client may be hostile.
//!
//! The authorize/callback endpoint faces the internet. `axum::serve` has no header-read timeout
//! and no connection cap, so clients that send their headers a byte at a time stay connected
//! forever: 200 of them took the operator from 16 to 93 MiB (issue 9). [`serve`] runs the router
//! on hyper's HTTP/1 connections directly, with the bounds of [`WebLimits`]:
//! - at most `max_connections` connections; a connection over the cap is closed as soon as it is
//!   accepted;
//! - `header_read_timeout` to send a request's head. hyper restarts it when a kept-alive
//!   connection waits for its next request, so it also bounds idle connections;
//! - `max_header_bytes` for the head (431 above it), also the cap on each connection's read
//!   buffer;
//! - `request_timeout` from the head to the response (503 after it);
//! - on shutdown, no new connections; open ones get [`SHUTDOWN_GRACE`] to finish.

use std::{
    convert::Infallible,
    io,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{Router, body::Body, response::Response};
use http::{HeaderValue, Request, StatusCode, header};
use hyper::{
    body::Incoming,
    server::conn::http1,
    service::{Service as _, service_fn},
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use tokio::{
    net::TcpListener,
    sync::{Semaphore, watch},
    task::JoinSet,
};
use tracing::{debug, warn};

use super::pages::security_headers;

/// Bounds on one listener's connections and requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebLimits {
    /// Time a client has to send a request's line and headers. It also limits how long a
    /// kept-alive connection may wait for its next request.
    pub header_read_timeout: Duration,
    /// Largest request head (line and headers) accepted; larger ones get 431. Also the cap on a
    /// connection's read buffer, which hyper does not allow below 8192 bytes.
    pub max_header_bytes: usize,
    /// Time from a request's head to its response, handler included; after it, 503.
    pub request_timeout: Duration,
    /// Connections open at once; any more are closed as soon as they are accepted.
    pub max_connections: usize,
}

impl Default for WebLimits {
    fn default() -> Self {
        WebLimits {
            header_read_timeout: Duration::from_secs(10),
            // The router's 8192-byte URI cap plus room for a browser's headers and cookies.
            max_header_bytes: 16 * 1024,
            request_timeout: Duration::from_secs(30),
            max_connections: 1024,
        }
    }
}

/// hyper's smallest allowed read buffer (it panics below it).
const MIN_BUF_SIZE: usize = 8192;
/// How long open connections may take to finish after the shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Shortest time between two warnings that the connection cap closed connections.
const CAP_WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// Serves `router` on `listener` within `limits` until `shutdown` turns `true` (or its sender
/// is dropped).
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: &WebLimits,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), String> {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_bytes)
        .max_buf_size(limits.max_header_bytes.max(MIN_BUF_SIZE))
        .keep_alive(true);
    let service = TowerToHyperService::new(router);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    // Owns the connection tasks: dropping it at the end aborts any that outlived the grace period.
    let mut connections = JoinSet::new();
    let mut refusals = Refusals::default();
    // Resolves once `shutdown` holds `true` or its sender is gone; holds no borrow across polls.
    let stopped = async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    tokio::pin!(stopped);
    loop {
        let stream = tokio::select! {
            _ = &mut stopped => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // Out of file descriptors or the like: retrying at once would spin
                    // (axum::serve waits a second too).
                    warn!(error = %e, "cannot accept connections; retrying in a second");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        // At the cap, the new connection is closed at once rather than left waiting for a
        // slot: waiting connections would pile up (file descriptors, memory) for as long as an
        // attacker holds the slots, and a closed one tells a real client at once to retry.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            refusals.count(limits.max_connections);
            continue;
        };
        let connection = http.serve_connection(
            TokioIo::new(stream),
            with_timeout(service.clone(), limits.request_timeout),
        );
        let connection = graceful.watch(connection);
        connections.spawn(async move {
            if let Err(e) = connection.await {
                // Timeouts, oversized heads and resets: the client's doing, not worth a warning.
                debug!(error = %e, "connection closed with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        warn!(
            open = connections.len(),
            "connections still open after the shutdown grace period; closing them"
        );
    }
    Ok(())
}

/// `service` with a cut-off: after `limit`, the handler is dropped and the client gets
/// [`timed_out`]. Hand-written rather than tower-http's `TimeoutLayer`, whose answer has an
/// empty body and none of the security headers.
fn with_timeout(
    service: TowerToHyperService<Router>,
    limit: Duration,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response,
    Error = Infallible,
    Future = impl Future<Output = Result<Response, Infallible>> + Send,
> {
    service_fn(move |request| {
        let response = service.call(request);
        async move {
            match tokio::time::timeout(limit, response).await {
                Ok(response) => response,
                Err(_) => Ok(timed_out()),
            }
        }
    })
}

/// The answer to a request the handler did not answer in time. Plain text: it may come from
/// either listener.
fn timed_out() -> Response {
    let mut response = Response::new(Body::from(
        "The server took too long to answer. Try again in a minute.\n",
    ));
    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    for (name, value) in security_headers() {
        headers.insert(name, value);
    }
    response
}

/// Errors about one connection that went away before it was accepted (as `axum::serve` does).
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Connections closed at the cap, warned about at most once per [`CAP_WARNING_INTERVAL`]:
/// one line per connection would let a flood of connections flood the log too.
#[derive(Default)]
struct Refusals {
    since_warning: u64,
    last_warning: Option<Instant>,
}

impl Refusals {
    fn count(&mut self, max_connections: usize) {
        self.since_warning += 1;
        if self
            .last_warning
            .is_none_or(|at| at.elapsed() >= CAP_WARNING_INTERVAL)
        {
            warn!(
                max_connections,
                closed = self.since_warning,
                "connection cap reached; closing new connections at once"
            );
            self.since_warning = 0;
            self.last_warning = Some(Instant::now());
        }
    }
}
