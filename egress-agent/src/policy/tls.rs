//! A DestinationRule's client TLS settings turned into a rustls configuration when the policy is
//! loaded, so that a missing or malformed certificate file is a policy error with a position, not
//! a failed connection later.
use std::{
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
};

use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore,
    SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor, verify_server_name,
    },
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject as _},
    server::ParsedCertificate,
};

use super::schema::{ClientTls, TlsMode};

/// A ready client configuration. Two are equal only when they are the same one.
#[derive(Clone)]
pub struct TlsClient(pub Arc<ClientConfig>);

impl TlsClient {
    /// The same, offering HTTP/2 (ALPN `h2`) instead of HTTP/1.1.
    pub fn for_h2(&self) -> TlsClient {
        let mut config = ClientConfig::clone(&self.0);
        config.alpn_protocols = vec![b"h2".to_vec()];
        TlsClient(Arc::new(config))
    }
}

impl PartialEq for TlsClient {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}
impl Eq for TlsClient {}

impl std::hash::Hash for TlsClient {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        Arc::as_ptr(&self.0).hash(state);
    }
}

impl fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("TlsClient")
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The host's CA store, read once: origination without `caCertificates` trusts it, as Istio's
/// sidecar trusts its image's.
fn system_roots() -> Result<Arc<RootCertStore>, String> {
    static ROOTS: OnceLock<Result<Arc<RootCertStore>, String>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut store = RootCertStore::empty();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found
                    .errors
                    .first()
                    .map_or_else(|| "none found".to_owned(), ToString::to_string);
                return Err(format!(
                    "the host has no usable CA certificates ({why}); set caCertificates"
                ));
            }
            Ok(Arc::new(store))
        })
        .clone()
}

/// Relative paths are taken from the directory of the policy file that names them.
fn resolve(base: &Path, path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() {
        p.to_owned()
    } else {
        base.parent().unwrap_or(Path::new(".")).join(p)
    }
}

fn certs(path: &Path, field: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            format!(
                "{field}: cannot read certificates from {}: {e}",
                path.display()
            )
        })?;
    if certs.is_empty() {
        return Err(format!(
            "{field}: {} holds no PEM certificate",
            path.display()
        ));
    }
    Ok(certs)
}

/// A name the upstream's certificate may hold in place of the host's (Istio's
/// `subjectAltNames`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AltName {
    /// A DNS name or an IP address, verified as a server name is (wildcards in the certificate).
    Server(ServerName<'static>),
    /// A URI, a SPIFFE id most often: one of the certificate's URI names, whole, as Envoy
    /// matches it.
    Uri(String),
}

impl fmt::Display for AltName {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            AltName::Server(name) => f.write_str(&name.to_str()),
            AltName::Uri(uri) => f.write_str(uri),
        }
    }
}

/// Reads `names` (the list at `field`): DNS names, IP addresses and URIs.
pub fn alt_names(names: &[String], field: &str) -> Result<Vec<AltName>, String> {
    names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            if let Ok(name) = ServerName::try_from(n.clone()) {
                Ok(AltName::Server(name))
            } else if is_uri(n) {
                Ok(AltName::Uri(n.clone()))
            } else {
                Err(format!(
                    "{field}[{i}]: `{n}` is not a DNS name, an IP address or a URI"
                ))
            }
        })
        .collect()
}

/// A scheme (RFC 3986: a letter, then letters, digits, `+`, `-`, `.`), a colon, and more,
/// without spaces or control characters.
fn is_uri(s: &str) -> bool {
    let Some((scheme, rest)) = s.split_once(':') else {
        return false;
    };
    scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        && !rest.is_empty()
        && rest.chars().all(|c| c.is_ascii_graphic())
}

/// Builds the configuration for `tls` (mode SIMPLE or MUTUAL), or says which field is wrong.
/// `field` is the settings' path, for messages; `file` the policy file, for relative paths.
/// `alt`: the names the certificate must hold one of instead of the host's, if any.
pub fn client_config(
    tls: &ClientTls,
    alt: Vec<AltName>,
    field: &str,
    file: &Path,
) -> Result<TlsClient, String> {
    let roots = match &tls.ca_certificates {
        Some(ca) => {
            let path = resolve(file, ca);
            let mut store = RootCertStore::empty();
            for cert in certs(&path, &format!("{field}.caCertificates"))? {
                store.add(cert).map_err(|e| {
                    format!(
                        "{field}.caCertificates: {}: not a usable CA certificate: {e}",
                        path.display()
                    )
                })?;
            }
            Arc::new(store)
        }
        None => system_roots().map_err(|e| format!("{field}: {e}"))?,
    };
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::clone(&roots), provider())
        .build()
        .map_err(|e| format!("{field}.caCertificates: {e}"))?;
    let verifier: Arc<dyn ServerCertVerifier> = if alt.is_empty() {
        webpki
    } else {
        Arc::new(AltNames {
            inner: webpki,
            roots,
            algorithms: provider().signature_verification_algorithms,
            names: alt,
        })
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("{field}: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match tls.mode {
        Some(TlsMode::Mutual) => {
            let (Some(cert), Some(key)) = (&tls.client_certificate, &tls.private_key) else {
                return Err(format!(
                    "{field}: mode MUTUAL needs clientCertificate and privateKey (credentialName \
                     names a Kubernetes secret, which egress does not read)"
                ));
            };
            let chain = certs(&resolve(file, cert), &format!("{field}.clientCertificate"))?;
            let key_path = resolve(file, key);
            let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| {
                format!(
                    "{field}.privateKey: cannot read a private key from {}: {e}",
                    key_path.display()
                )
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("{field}.clientCertificate: {e}"))?
        }
        _ => builder.with_no_client_auth(),
    };
    // The relay speaks HTTP/1.1 upstream.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsClient(Arc::new(config)))
}

/// Verifies the chain as usual, but against the names the policy lists instead of the name the
/// connection was made for (Istio's `subjectAltNames`): the certificate must hold one of them.
#[derive(Debug)]
struct AltNames {
    /// For the handshake's signatures.
    inner: Arc<WebPkiServerVerifier>,
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
    names: Vec<AltName>,
}

/// The certificate holds none of the names listed.
#[derive(Debug)]
struct NoneHeld(String);

impl fmt::Display for NoneHeld {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "the certificate names none of subjectAltNames [{}]",
            self.0
        )
    }
}

impl std::error::Error for NoneHeld {}

impl ServerCertVerifier for AltNames {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let uris = || -> Vec<String> {
            webpki::EndEntityCert::try_from(end_entity)
                .map(|c| c.valid_uri_names().map(str::to_owned).collect())
                .unwrap_or_default()
        };
        let mut presented = None;
        let held = self.names.iter().any(|name| match name {
            AltName::Server(n) => verify_server_name(&cert, n).is_ok(),
            AltName::Uri(u) => presented.get_or_insert_with(uris).contains(u),
        });
        if held {
            return Ok(ServerCertVerified::assertion());
        }
        let listed: Vec<String> = self.names.iter().map(ToString::to_string).collect();
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            OtherError(Arc::new(NoneHeld(listed.join(", ")))),
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
