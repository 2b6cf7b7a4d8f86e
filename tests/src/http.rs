//! HTTP/1.1 over a raw socket for the suites: probes, scrapes and
//! diagnostics, with no client library between the test and the wire.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// GETs `path` over plain HTTP/1.1 and returns the status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.map_err(|err| format!("connect: {err}"))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.map_err(|err| format!("write: {err}"))?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.map_err(|err| format!("read: {err}"))?;
    let response = String::from_utf8(response).map_err(|err| format!("not UTF-8: {err}"))?;
    let (head, body) = response.split_once("\r\n\r\n").ok_or("no header end")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    Ok((status, dechunk_if(head, body)))
}

/// The body, de-chunked when the head says it is chunked.
pub fn dechunk_if(head: &str, body: &str) -> String {
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_string() }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else { break };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}
