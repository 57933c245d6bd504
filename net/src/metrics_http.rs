//! The Prometheus scrape endpoint: a small blocking HTTP/1.1 responder on its own thread,
//! serving `GET /metrics` one connection at a time. It never touches a shard's state directly:
//! counters are read from their atomics, and committed group offsets are asked of each shard
//! over the [`Router`].

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::NetError;
use crate::metrics::{CommittedOffset, Metrics};
use crate::shard::{Job, Router};

/// Largest request head (request line and headers) read from a scraper.
pub const MAX_REQUEST_HEAD_BYTES: usize = 8 * 1024;
/// A scraper that sends nothing, or reads nothing, for this long is dropped.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a scrape waits for the shards' committed offsets before answering without them.
const SHARD_ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The running endpoint; [`MetricsServer::stop`] ends its thread.
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    pub fn start(
        listen: SocketAddr,
        metrics: Arc<Metrics>,
        router: Router,
    ) -> Result<MetricsServer, NetError> {
        let listener = TcpListener::bind(listen)
            .map_err(|e| NetError::Config(format!("cannot listen for metrics on {listen}: {e}")))?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("spate-metrics".into())
                .spawn(move || serve(listener, &metrics, &router, &stop))?
        };
        tracing::info!(%addr, "metrics listening");
        Ok(MetricsServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the blocking accept; a failed connect means the thread is gone already.
        let _ = TcpStream::connect_timeout(&self.addr, CLIENT_TIMEOUT);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(listener: TcpListener, metrics: &Metrics, router: &Router, stop: &AtomicBool) {
    for conn in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            return;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                // Back off so an exhausted fd table does not spin this thread.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if let Err(e) = answer(stream, metrics, router) {
            tracing::debug!(error = %e, "metrics request failed");
        }
    }
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Metrics,
    NotFound,
    MethodNotAllowed,
    BadRequest,
}

/// Routes a request head (sans-IO): only `GET /metrics` (with any query) is served.
pub fn route(head: &[u8]) -> Route {
    let Some(line) = head.split(|b| *b == b'\n').next() else {
        return Route::BadRequest;
    };
    let line = String::from_utf8_lossy(line);
    let mut parts = line.trim_end().split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if !version.starts_with("HTTP/1.") || parts.next().is_some() {
        return Route::BadRequest;
    }
    let path = target.split('?').next().unwrap_or(target);
    match (method, path) {
        ("GET", "/metrics") => Route::Metrics,
        ("GET", _) => Route::NotFound,
        _ => Route::MethodNotAllowed,
    }
}

fn answer(mut stream: TcpStream, metrics: &Metrics, router: &Router) -> std::io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() >= MAX_REQUEST_HEAD_BYTES {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
            );
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..n]);
    }
    match route(&head) {
        Route::Metrics => {
            let body = metrics.render(committed_offsets(router));
            respond(&mut stream, "200 OK", CONTENT_TYPE, &body)
        }
        Route::NotFound => respond(&mut stream, "404 Not Found", "text/plain", "try /metrics\n"),
        Route::MethodNotAllowed => respond(&mut stream, "405 Method Not Allowed", "text/plain", ""),
        Route::BadRequest => respond(&mut stream, "400 Bad Request", "text/plain", ""),
    }
}

fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    stream.flush()
}

/// Every shard's committed group offsets; a shard that does not answer in time is left out.
fn committed_offsets(router: &Router) -> Vec<CommittedOffset> {
    let (tx, rx) = flume::unbounded::<Vec<CommittedOffset>>();
    let mut asked = 0;
    for shard in 0..router.shards() {
        let tx = tx.clone();
        let job: Job = Box::new(move |_| {
            Box::pin(async move {
                let _ = tx.send(crate::group::committed_offsets());
            })
        });
        if router.send_blocking(shard, job).is_ok() {
            asked += 1;
        }
    }
    drop(tx);
    let deadline = Instant::now() + SHARD_ANSWER_TIMEOUT;
    let mut all = Vec::new();
    for _ in 0..asked {
        match rx.recv_deadline(deadline) {
            Ok(v) => all.extend(v),
            Err(_) => {
                tracing::warn!("a shard did not report group offsets for a metrics scrape");
                break;
            }
        }
    }
    all.sort_by(|a, b| (&a.group, &a.topic, a.partition).cmp(&(&b.group, &b.topic, b.partition)));
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_get_metrics_is_served() {
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics
        );
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Route::Metrics);
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(
            route(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Route::MethodNotAllowed
        );
        assert_eq!(route(b"GET /metrics\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(b"\x00\xff garbage"), Route::BadRequest);
    }
}
