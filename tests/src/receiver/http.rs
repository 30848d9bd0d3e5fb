//! The receiver's HTTP/1.1 side: a thread per keep-alive connection, requests framed by
//! Content-Length, every wait bounded by the receiver's shutdown flag.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::service;
use super::{Answer, Request, Shared};

/// How often a connection thread looks at the shutdown flag while it waits for bytes.
const READ_POLL: Duration = Duration::from_millis(200);
/// How long the accept loop sleeps when no connection is waiting.
const ACCEPT_POLL: Duration = Duration::from_millis(20);
/// A hanging answer gives up after this even if the receiver is never dropped.
const HANG_MAX: Duration = Duration::from_secs(300);
const HEAD_MAX: usize = 64 * 1024;
const BODY_MAX: usize = 4 * 1024 * 1024;

/// Accepts connections until the receiver stops, then waits for their threads.
pub(super) fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections: Vec<JoinHandle<()>> = Vec::new();
    while !shared.stopping() {
        match listener.accept() {
            Ok((stream, _)) => {
                let shared = shared.clone();
                let spawned = thread::Builder::new()
                    .name("receiver-conn".into())
                    .spawn(move || serve_connection(stream, &shared));
                match spawned {
                    Ok(handle) => connections.push(handle),
                    Err(e) => eprintln!("receiver: cannot start a connection thread: {e}"),
                }
                connections.retain(|c| !c.is_finished());
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(ACCEPT_POLL),
            Err(e) => {
                eprintln!("receiver: accept failed: {e}");
                thread::sleep(ACCEPT_POLL);
            }
        }
    }
    for connection in connections {
        let _ = connection.join();
    }
}

/// Serves requests on one keep-alive connection until the client closes it or the
/// receiver stops.
fn serve_connection(mut stream: TcpStream, shared: &Shared) {
    if stream.set_nonblocking(false).is_err() || stream.set_read_timeout(Some(READ_POLL)).is_err() {
        return;
    }
    let mut buffer: Vec<u8> = Vec::new();
    loop {
        let Some((head_len, content_length)) = read_head(&mut stream, &mut buffer, shared) else {
            return;
        };
        let Some(content_length) = content_length else {
            let _ = respond(&mut stream, 411, &[], "text/plain", "length required");
            return;
        };
        if content_length > BODY_MAX {
            let _ = respond(&mut stream, 413, &[], "text/plain", "payload too large");
            return;
        }
        if !read_to(&mut stream, &mut buffer, head_len + content_length, shared) {
            return;
        }
        let head = String::from_utf8_lossy(&buffer[..head_len]).into_owned();
        let body = buffer[head_len..head_len + content_length].to_vec();
        buffer.drain(..head_len + content_length);

        let (index, answer) = record(shared, &head, &body);
        if answer == Answer::Hang {
            hang(shared);
            return;
        }
        let reply = service::reply(shared, index, answer);
        shared.state().requests[index].status = Some(reply.status);
        let headers: Vec<(&str, String)> = reply
            .retry_after
            .map(|s| ("Retry-After", s.to_string()))
            .into_iter()
            .collect();
        if respond(
            &mut stream,
            reply.status,
            &headers,
            reply.content_type,
            &reply.body,
        )
        .is_err()
        {
            return;
        }
    }
}

/// Reads until the buffer holds a whole request head; returns its length (with the blank
/// line) and the Content-Length it names. None when the connection ends or the receiver
/// stops.
fn read_head(
    stream: &mut TcpStream,
    buffer: &mut Vec<u8>,
    shared: &Shared,
) -> Option<(usize, Option<usize>)> {
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]);
            let chunked = header(&head, "transfer-encoding")
                .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
            let length = match header(&head, "content-length") {
                Some(v) => v.trim().parse().ok(),
                None if chunked => None,
                None => Some(0),
            };
            return Some((end + 4, length));
        }
        if buffer.len() > HEAD_MAX || !read_more(stream, buffer, shared) {
            return None;
        }
    }
}

/// Reads until the buffer holds `len` bytes; false when the connection ends first.
fn read_to(stream: &mut TcpStream, buffer: &mut Vec<u8>, len: usize, shared: &Shared) -> bool {
    while buffer.len() < len {
        if !read_more(stream, buffer, shared) {
            return false;
        }
    }
    true
}

/// One read, retried across read timeouts until data, EOF, an error, or shutdown.
fn read_more(stream: &mut TcpStream, buffer: &mut Vec<u8>, shared: &Shared) -> bool {
    let mut chunk = [0u8; 8192];
    loop {
        if shared.stopping() {
            return false;
        }
        match stream.read(&mut chunk) {
            Ok(0) => return false,
            Ok(n) => {
                buffer.extend_from_slice(&chunk[..n]);
                return true;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case(name)
            .then_some(value.trim())
    })
}

/// Records the request with what the real service would reject, and picks its answer.
fn record(shared: &Shared, head: &str, body: &[u8]) -> (usize, Answer) {
    let mut request_line = head.lines().next().unwrap_or("").split_whitespace();
    let method = request_line.next().unwrap_or("").to_string();
    let path = request_line.next().unwrap_or("").to_string();
    let headers: HashMap<String, String> = head
        .lines()
        .skip(1)
        .filter_map(|line| {
            let (key, value) = line.split_once(':')?;
            Some((key.trim().to_ascii_lowercase(), value.trim().to_string()))
        })
        .collect();
    let parsed: Result<Value, _> = serde_json::from_slice(body);
    let mut problems = Vec::new();
    if method != "POST" {
        problems.push(format!("method {method}, expected POST"));
    }
    if !headers
        .get("content-type")
        .is_some_and(|c| c.starts_with("application/json"))
    {
        problems.push(format!(
            "content-type {:?}, expected application/json",
            headers.get("content-type")
        ));
    }
    let body = match parsed {
        Ok(v) => v,
        Err(e) => {
            problems.push(format!("body is not JSON: {e}"));
            Value::Null
        }
    };

    let mut state = shared.state();
    let answer = state
        .script
        .pop_front()
        .or(state.otherwise)
        .unwrap_or(Answer::Normal);
    problems.extend(service::check(
        shared.service,
        &path,
        &headers,
        &body,
        &state.posted,
    ));
    state.requests.push(Request {
        at: Instant::now(),
        method,
        path,
        headers,
        body,
        status: None,
        problems,
    });
    (state.requests.len() - 1, answer)
}

/// Holds the connection without answering until the receiver stops (or HANG_MAX passes).
fn hang(shared: &Shared) {
    let (flag, signal) = &shared.stopped;
    let guard = flag.lock().expect("receiver stop flag poisoned");
    let _ = signal
        .wait_timeout_while(guard, HANG_MAX, |stopped| !*stopped)
        .expect("receiver stop flag poisoned");
}

fn respond(
    stream: &mut TcpStream,
    status: u16,
    headers: &[(&str, String)],
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        411 => "Length Required",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        _ => "Internal Server Error",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(body);
    stream.write_all(out.as_bytes())?;
    stream.flush()
}
