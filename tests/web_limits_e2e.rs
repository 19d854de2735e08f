//! The endpoint's bounds against hostile clients (issue 9): slow clients are cut off after the
//! header-read timeout while a real user is still served, an oversized head is refused, and a
//! connection over the cap is closed at once. The tests talk only to the operator's endpoint,
//! so they run against a real cluster too.
//!
//! `rss_under_slow_clients` is ignored: it is the memory measurement of BENCHMARKS.md, run with
//! `cargo test --release --test web_limits_e2e -- --ignored --nocapture`.

mod common;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use axum::body::Body;
use common::{
    Browser, Cluster, Stack, bind_callback, eventually,
    operator::{InProcessOperator, Options},
};
use goto_oauth_operator::web::server::WebLimits;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    task::JoinHandle,
};

/// Slow clients held against the endpoint at once.
const SLOW_CLIENTS: usize = 500;
/// The header-read timeout the tests give the operator.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a user's request may take while the slow clients are held.
const ANSWER_WITHIN: Duration = Duration::from_secs(2);
/// Lateness allowed to the server's closing of a timed-out connection.
const CLOSE_SLACK: Duration = Duration::from_secs(10);
/// How often a slow client sends its next header byte.
const DRIBBLE_INTERVAL: Duration = Duration::from_millis(500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_while_a_user_is_served() {
    let header_timeout = format!("--header-read-timeout={}s", HEADER_READ_TIMEOUT.as_secs());
    let stack = Stack::start(&[&header_timeout]).await;
    let link = stack.client("limits", serde_json::json!({})).await;
    let addr = endpoint(&stack.op.public_url);

    let slow = SlowClients::hold(addr, SLOW_CLIENTS, 0).await;
    // A kept-alive connection after one complete request: idle, it is bounded as well.
    let mut idle = Connection::open(addr).await.expect("connect");
    assert_eq!(idle.get("/nothing-here").await, Ok(404));
    let idle_since = Instant::now();

    // A user opening the link is answered at once while the slow clients are held...
    let mut browser = Browser::new();
    let response = tokio::time::timeout(ANSWER_WITHIN, browser.get_raw(&link))
        .await
        .expect("the link is answered while slow clients are held");
    assert_eq!(
        response.status().as_u16(),
        302,
        "the link redirects to GoTo"
    );
    let answered_at = Instant::now();

    // ...and the server closes every slow client after the header-read timeout, not before.
    let closed = futures::future::join_all(slow.readers.into_iter().map(
        |(connected, read)| async move {
            let closed = tokio::time::timeout(HEADER_READ_TIMEOUT + CLOSE_SLACK, closed(read))
                .await
                .ok();
            (connected, closed)
        },
    ))
    .await;
    for (connected, closed) in closed {
        let closed = closed.expect("the server closes a slow client");
        assert!(
            closed > answered_at,
            "a slow client was closed before the user was answered"
        );
        assert!(
            closed - connected >= HEADER_READ_TIMEOUT - Duration::from_millis(100),
            "a slow client was closed after {:?}, before the header-read timeout",
            closed - connected
        );
    }
    slow.dribbler.abort();
    let idle_closed = tokio::time::timeout(HEADER_READ_TIMEOUT + CLOSE_SLACK, idle.closed())
        .await
        .expect("the server closes an idle kept-alive connection");
    assert!(idle_closed - idle_since >= HEADER_READ_TIMEOUT - Duration::from_millis(100));

    // A head over the cap is refused (431, or closed mid-send); one well under it is served.
    let max = WebLimits::default().max_header_bytes;
    let refused = send_raw(addr, &request_with_header(max + 8 * 1024)).await;
    assert!(
        refused.is_empty() || refused.starts_with("HTTP/1.1 431"),
        "oversized head: {refused:.80}"
    );
    // A browser of its own: the first one's kept-alive connection has been idle for the
    // header-read timeout by now, and the server may be closing it just as it is reused.
    let padded = Browser::new()
        .http
        .get(&link)
        .header("x-padding", "a".repeat(max - 4 * 1024))
        .send()
        .await
        .expect("request with large headers");
    assert_eq!(
        padded.status().as_u16(),
        302,
        "a head under the cap is served"
    );
    stack.op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_closed_at_once() {
    const CAP: usize = 4;
    let cluster = Cluster::start().await;
    let (listener, _) = bind_callback().await;
    let addr = listener.local_addr().expect("local addr");
    let options = Options {
        web_limits: WebLimits {
            max_connections: CAP,
            ..WebLimits::default()
        },
        ..Options::new(
            &cluster.namespace,
            "http://127.0.0.1:1/authorize",
            "http://127.0.0.1:1/token",
        )
    };
    let op = InProcessOperator::start(cluster.client.clone(), listener, options)
        .await
        .expect("operator starts");

    // Answered, so accepted: each holds a slot while kept alive.
    let mut held = Vec::new();
    for _ in 0..CAP {
        let mut connection = Connection::open(addr).await.expect("connect");
        assert_eq!(connection.get("/held").await, Ok(404));
        held.push(connection);
    }
    let (over, _write) = TcpStream::connect(addr)
        .await
        .expect("connect")
        .into_split();
    tokio::time::timeout(Duration::from_secs(2), closed(over))
        .await
        .expect("a connection over the cap is closed at once");
    for connection in &mut held {
        assert_eq!(connection.get("/still-served").await, Ok(404));
    }

    // A slot freed by a closed connection serves a new one.
    drop(held.pop());
    eventually("a new connection is served once a slot is free", || async {
        let mut connection = Connection::open(addr).await.ok()?;
        (connection.get("/again").await == Ok(404)).then_some(())
    })
    .await;

    // Shutting down closes the idle kept-alive connections.
    op.stop().await;
    for connection in held {
        tokio::time::timeout(Duration::from_secs(2), connection.closed())
            .await
            .expect("shutdown closes idle connections");
    }
}

/// The memory measurement of BENCHMARKS.md ("Slow clients"): the operator binary's VmRSS idle
/// and while [`SLOW_CLIENTS`] slow clients are held, with the default limits. It passes no new
/// flag, so the same test measures an operator from before the limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check: see BENCHMARKS.md"]
async fn rss_under_slow_clients() {
    /// How long the clients are held before the measurement (under the 10 s header timeout).
    const HOLD: Duration = Duration::from_secs(5);
    let stack = Stack::start(&[]).await;
    let link = stack.client("rss", serde_json::json!({})).await;
    let pid = stack.op.child.id().expect("operator pid");
    let addr = endpoint(&stack.op.public_url);
    let mut browser = Browser::new();
    browser.get_raw(&link).await;
    println!("rss: idle: {}", memory(pid));
    for (what, head_bytes) in [
        ("heads dribbled from the first byte", 0),
        ("12 KiB heads, then dribbled", 12 * 1024),
        ("64 KiB heads, then dribbled", 64 * 1024),
    ] {
        let mut slow = SlowClients::hold(addr, SLOW_CLIENTS, head_bytes).await;
        // Fixed waits are the measurement here: memory while the clients have been held for HOLD.
        tokio::time::sleep(HOLD).await;
        let started = Instant::now();
        let status = browser.get_raw(&link).await.status();
        let answered = started.elapsed();
        let open = slow.open().await;
        println!(
            "rss: {SLOW_CLIENTS} slow clients, {what}: {}; {open} still open after {HOLD:?}; \
             the link answered {status} in {answered:?}",
            memory(pid)
        );
        slow.leave();
        tokio::time::sleep(Duration::from_secs(2)).await;
        println!("rss: after they left: {}", memory(pid));
    }
    stack.op.stop().await;
}

/// VmRSS and VmHWM of process `pid`, as `/proc/<pid>/status` gives them.
fn memory(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map_or("?".to_string(), |v| v.trim().to_string())
    };
    format!("VmRSS {}, VmHWM {}", field("VmRSS:"), field("VmHWM:"))
}

/// `127.0.0.1:PORT` of `http://127.0.0.1:PORT`.
fn endpoint(public_url: &str) -> SocketAddr {
    public_url
        .trim_start_matches("http://")
        .parse()
        .expect("public URL is http://IP:PORT")
}

/// Clients that start a request and then send their headers a byte at a time, never finishing.
struct SlowClients {
    /// When each connected, and its read half (to see the server close it).
    readers: Vec<(Instant, OwnedReadHalf)>,
    /// Sends the next byte on every connection every [`DRIBBLE_INTERVAL`].
    dribbler: JoinHandle<()>,
}

impl SlowClients {
    /// Connects `n` clients, each sending a request line and `head_bytes` of an unfinished header.
    async fn hold(addr: SocketAddr, n: usize, head_bytes: usize) -> SlowClients {
        let mut start = b"GET /slow HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ".to_vec();
        start.resize(start.len() + head_bytes, b'a');
        let mut readers = Vec::with_capacity(n);
        let mut writers: Vec<OwnedWriteHalf> = Vec::with_capacity(n);
        for _ in 0..n {
            let stream = TcpStream::connect(addr).await.expect("connect");
            let (read, mut write) = stream.into_split();
            // The server may already have refused a long head: its answer is read later.
            let _ = write.write_all(&start).await;
            readers.push((Instant::now(), read));
            writers.push(write);
        }
        let dribbler = tokio::spawn(async move {
            // At most a minute of dribbling; the tests are done long before.
            for _ in 0..120 {
                tokio::time::sleep(DRIBBLE_INTERVAL).await;
                for write in &mut writers {
                    let _ = write.write_all(b"a").await;
                }
            }
        });
        SlowClients { readers, dribbler }
    }

    /// How many the server has not closed: reading one finds no end within a moment (an
    /// answer such as 431 before the end is read past).
    async fn open(&mut self) -> usize {
        let mut open = 0;
        for (_, read) in &mut self.readers {
            let mut buf = [0u8; 4096];
            for _ in 0..16 {
                match tokio::time::timeout(Duration::from_millis(1), read.read(&mut buf)).await {
                    Err(_) => {
                        open += 1;
                        break;
                    }
                    Ok(Ok(0) | Err(_)) => break,
                    Ok(Ok(_)) => {}
                }
            }
        }
        open
    }

    /// Stops dribbling and closes every connection.
    fn leave(self) {
        self.dribbler.abort();
    }
}

/// Reads until the server ends the connection (EOF or reset); when it did.
async fn closed(mut read: OwnedReadHalf) -> Instant {
    let mut buf = [0u8; 4096];
    loop {
        match read.read(&mut buf).await {
            Ok(0) | Err(_) => return Instant::now(),
            Ok(_) => {}
        }
    }
}

/// A request whose one header has `size` bytes of value.
fn request_with_header(size: usize) -> Vec<u8> {
    let mut request = b"GET /big HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ".to_vec();
    request.resize(request.len() + size, b'a');
    request.extend_from_slice(b"\r\n\r\n");
    request
}

/// Sends `request` on a new connection; what the server answered before closing it (empty if
/// it closed without an answer).
async fn send_raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    // The server may close before the whole request is sent.
    let _ = stream.write_all(request).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(ANSWER_WITHIN, stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// One kept-alive HTTP/1 connection.
struct Connection {
    sender: SendRequest<Body>,
    task: JoinHandle<()>,
}

impl Connection {
    async fn open(addr: SocketAddr) -> Result<Connection, hyper::Error> {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let task = tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Connection { sender, task })
    }

    /// GET `path` on this connection; the status.
    async fn get(&mut self, path: &str) -> Result<u16, String> {
        let request = http::Request::get(path)
            .header("host", "127.0.0.1")
            .body(Body::empty())
            .map_err(|e| e.to_string())?;
        self.sender.ready().await.map_err(|e| e.to_string())?;
        let response = tokio::time::timeout(ANSWER_WITHIN, self.sender.send_request(request))
            .await
            .map_err(|_| format!("GET {path}: no answer"))?
            .map_err(|e| e.to_string())?;
        Ok(response.status().as_u16())
    }

    /// Waits until the connection ends; when it did.
    async fn closed(self) -> Instant {
        let _sender = self.sender;
        let _ = self.task.await;
        Instant::now()
    }
}
