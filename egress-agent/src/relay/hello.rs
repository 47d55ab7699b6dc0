//! Reading a TLS ClientHello off a connection without answering it: every byte read is kept, to be
//! sent upstream unchanged once the hello has been judged.
use std::{io, time::Duration};

use rustls::server::Acceptor;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _},
    time::timeout_at,
};

/// What the relay needs from a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub sni: Option<String>,
    pub alpn: Vec<String>,
    /// Every byte read so far: the hello and whatever followed it in the same reads.
    pub bytes: Vec<u8>,
}

/// Why no ClientHello was read. The text goes into the relay event's `reason`.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    #[error("no complete ClientHello within {0:?}")]
    Timeout(Duration),
    #[error("ClientHello larger than {0} bytes")]
    TooLarge(usize),
    #[error("connection closed before a complete ClientHello")]
    Closed,
    #[error("not a TLS ClientHello: {0}")]
    NotTls(rustls::Error),
    #[error("reading the ClientHello: {0}")]
    Io(#[from] io::Error),
}

/// Bytes asked for per read.
const READ: usize = 4096;

/// Reads until a whole ClientHello has arrived, however it is split across segments and TLS
/// records, giving up after `limit` bytes or at `wait`.
pub async fn read<R: AsyncRead + Unpin>(
    stream: &mut R,
    limit: usize,
    wait: Duration,
) -> Result<Hello, HelloError> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut acceptor = Acceptor::default();
    // Read straight into `bytes`: a buffer held across the await would sit in every relay
    // connection's future, which is moved (copied) when the connection's task is spawned.
    let mut bytes = Vec::with_capacity(READ);
    loop {
        let seen = bytes.len();
        let room = (limit + 1).saturating_sub(seen).min(READ);
        bytes.reserve(room);
        let n = timeout_at(
            deadline,
            (&mut *stream).take(room as u64).read_buf(&mut bytes),
        )
        .await
        .map_err(|_| HelloError::Timeout(wait))??;
        if n == 0 {
            return Err(HelloError::Closed);
        }
        if bytes.len() > limit {
            return Err(HelloError::TooLarge(limit));
        }
        let mut fresh = &bytes[seen..];
        while !fresh.is_empty() {
            acceptor.read_tls(&mut fresh)?;
        }
        match acceptor.accept() {
            Ok(None) => continue,
            Ok(Some(accepted)) => {
                let hello = accepted.client_hello();
                return Ok(Hello {
                    sni: hello.server_name().map(str::to_owned),
                    alpn: hello
                        .alpn()
                        .into_iter()
                        .flatten()
                        .map(|p| String::from_utf8_lossy(p).into_owned())
                        .collect(),
                    bytes,
                });
            }
            Err((e, _alert)) => return Err(HelloError::NotTls(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real ClientHello, as rustls's client writes it.
    fn client_hello(name: &str) -> Vec<u8> {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let mut config = config;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let mut conn = rustls::ClientConnection::new(
            std::sync::Arc::new(config),
            name.to_owned().try_into().expect("server name"),
        )
        .expect("client");
        let mut out = Vec::new();
        conn.write_tls(&mut out).expect("hello");
        out
    }

    #[tokio::test]
    async fn reads_sni_and_alpn_and_keeps_every_byte() {
        let mut bytes = client_hello("api.example.com");
        bytes.extend_from_slice(b"trailing");
        let hello = read(&mut &bytes[..], 65536, Duration::from_secs(1))
            .await
            .expect("hello");
        assert_eq!(hello.sni.as_deref(), Some("api.example.com"));
        assert_eq!(hello.alpn, ["h2", "http/1.1"]);
        assert!(bytes.starts_with(&hello.bytes));
    }

    #[tokio::test]
    async fn a_hello_split_byte_by_byte_is_read() {
        let bytes = client_hello("split.example.com");
        let (mut client, mut server) = tokio::io::duplex(1);
        let sender = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt as _;
            for b in bytes {
                client.write_all(&[b]).await.expect("write");
            }
            client
        });
        let hello = read(&mut server, 65536, Duration::from_secs(5))
            .await
            .expect("hello");
        assert_eq!(hello.sni.as_deref(), Some("split.example.com"));
        drop(sender.await);
    }

    #[tokio::test]
    async fn plain_text_and_oversized_and_short_input_are_refused() {
        let http = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        assert!(matches!(
            read(&mut &http[..], 65536, Duration::from_secs(1)).await,
            Err(HelloError::NotTls(_))
        ));
        let hello = client_hello("api.example.com");
        assert!(matches!(
            read(&mut &hello[..], 100, Duration::from_secs(1)).await,
            Err(HelloError::TooLarge(100))
        ));
        assert!(matches!(
            read(&mut &hello[..20], 65536, Duration::from_secs(1)).await,
            Err(HelloError::Closed)
        ));
    }
}
