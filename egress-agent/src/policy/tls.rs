//! A DestinationRule's client TLS settings turned into a rustls configuration when the policy is
//! loaded, so that a missing or malformed certificate file is a policy error with a position, not
//! a failed connection later.
use std::{
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
};

use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject as _},
};

use super::schema::{ClientTls, TlsMode};

/// A ready client configuration. Two are equal only when they are the same one.
#[derive(Clone)]
pub struct TlsClient(pub Arc<ClientConfig>);

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

/// Builds the configuration for `tls` (mode SIMPLE or MUTUAL), or says which field is wrong.
/// `field` is the settings' path, for messages; `file` the policy file, for relative paths.
pub fn client_config(tls: &ClientTls, field: &str, file: &Path) -> Result<TlsClient, String> {
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
    let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| format!("{field}.caCertificates: {e}"))?;
    let verifier: Arc<dyn ServerCertVerifier> = if tls.subject_alt_names.is_empty() {
        webpki
    } else {
        let names = tls
            .subject_alt_names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                ServerName::try_from(n.clone()).map_err(|_| {
                    format!(
                        "{field}.subjectAltNames[{i}]: `{n}` is not a DNS name or an IP address"
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Arc::new(AltNames {
            inner: webpki,
            names,
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

/// Verifies the chain as usual, but against the names the DestinationRule lists instead of the
/// name the connection was made for (Istio's `subjectAltNames`).
#[derive(Debug)]
struct AltNames {
    inner: Arc<WebPkiServerVerifier>,
    names: Vec<ServerName<'static>>,
}

impl ServerCertVerifier for AltNames {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut last = rustls::Error::General("no subjectAltNames to verify".to_owned());
        for name in &self.names {
            match self
                .inner
                .verify_server_cert(end_entity, intermediates, name, ocsp, now)
            {
                Ok(ok) => return Ok(ok),
                Err(e) => last = e,
            }
        }
        Err(last)
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
