//! The smallest HTTP/1.1 client the simulator needs: JSON POST/PUT over one
//! mutual-TLS connection per attestation (challenge and evidence share it).
//! Hand-written rather than reqwest because a reqwest client per virtual host
//! (100,000 of them, each with its own certificate) costs far too much memory.

use super::SimError;
use rustls::pki_types::ServerName;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Largest response head and body accepted from the server.
const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 1024 * 1024;

/// Where the server listens, parsed from an `https://host:port` URL.
#[derive(Debug, Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub server_name: ServerName<'static>,
}

impl Target {
    pub fn parse(url: &str) -> Result<Self, SimError> {
        let bad = |problem: &str| SimError::Config {
            key: "server_url".into(),
            problem: format!("{url:?}: {problem}"),
        };
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| bad("must be an https:// URL"))?;
        let authority = rest.split('/').next().unwrap_or_default();
        let (host, port) = authority
            .rsplit_once(':')
            .ok_or_else(|| bad("needs an explicit port"))?;
        let port: u16 = port.parse().map_err(|_| bad("bad port"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let server_name = ServerName::try_from(host.clone()).map_err(|_| bad("bad host name"))?;
        Ok(Self {
            host,
            port,
            server_name,
        })
    }
}

/// A response: status and body.
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// One TLS connection to the server.
pub struct Conn {
    stream: TlsStream<TcpStream>,
    authority: String,
    buf: Vec<u8>,
    pub resumed: bool,
}

impl Conn {
    pub async fn connect(
        target: &Target,
        config: Arc<rustls::ClientConfig>,
    ) -> Result<Self, SimError> {
        let tcp = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|e| SimError::Transport {
                code: "connect",
                detail: e.to_string(),
            })?;
        let _ = tcp.set_nodelay(true);
        let stream = TlsConnector::from(config)
            .connect(target.server_name.clone(), tcp)
            .await
            .map_err(|e| SimError::Transport {
                code: "tls_handshake",
                detail: e.to_string(),
            })?;
        let resumed = matches!(
            stream.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed)
        );
        Ok(Self {
            stream,
            authority: format!("{}:{}", target.host, target.port),
            buf: Vec::with_capacity(2048),
            resumed,
        })
    }

    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<Response, SimError> {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            self.authority,
            body.len()
        );
        let mut req = Vec::with_capacity(head.len() + body.len());
        req.extend_from_slice(head.as_bytes());
        req.extend_from_slice(body);
        self.stream
            .write_all(&req)
            .await
            .map_err(|e| transport("write", e))?;
        self.stream
            .flush()
            .await
            .map_err(|e| transport("write", e))?;
        self.read_response().await
    }

    async fn read_response(&mut self) -> Result<Response, SimError> {
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            if self.buf.len() > MAX_HEAD {
                return Err(malformed("response head too large"));
            }
            self.fill().await?;
        };
        let head = std::str::from_utf8(self.buf.get(..head_end).unwrap_or_default())
            .map_err(|_| malformed("response head is not UTF-8"))?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| malformed("bad status line"))?;
        let mut length = None;
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let name = name.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(
                    value
                        .trim()
                        .parse::<usize>()
                        .map_err(|_| malformed("bad content-length"))?,
                );
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                return Err(malformed("chunked responses are not supported"));
            }
        }
        let length = length.unwrap_or(0);
        if length > MAX_BODY {
            return Err(malformed("response body too large"));
        }
        let body_start = head_end + 4;
        let body_end = body_start
            .checked_add(length)
            .ok_or_else(|| malformed("response body too large"))?;
        while self.buf.len() < body_end {
            self.fill().await?;
        }
        let body = self
            .buf
            .get(body_start..body_end)
            .unwrap_or_default()
            .to_vec();
        self.buf.drain(..body_end);
        Ok(Response { status, body })
    }

    async fn fill(&mut self) -> Result<(), SimError> {
        let mut chunk = [0u8; 4096];
        let n = self
            .stream
            .read(&mut chunk)
            .await
            .map_err(|e| transport("read", e))?;
        if n == 0 {
            return Err(SimError::Transport {
                code: "connection_closed",
                detail: "the server closed the connection".into(),
            });
        }
        self.buf
            .extend_from_slice(chunk.get(..n).unwrap_or_default());
        Ok(())
    }

    /// Close politely (close_notify) so the server frees the connection at once.
    pub async fn close(mut self) {
        let _ = self.stream.shutdown().await;
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn transport(code: &'static str, e: std::io::Error) -> SimError {
    SimError::Transport {
        code,
        detail: e.to_string(),
    }
}

fn malformed(detail: &str) -> SimError {
    SimError::Transport {
        code: "bad_response",
        detail: detail.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_from_urls() {
        let t = Target::parse("https://127.0.0.1:8443").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("127.0.0.1", 8443));
        let t = Target::parse("https://localhost:1/x").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("localhost", 1));
        assert!(Target::parse("http://127.0.0.1:1").is_err());
        assert!(Target::parse("https://127.0.0.1").is_err());
        assert!(Target::parse("https://127.0.0.1:99999").is_err());
    }
}
