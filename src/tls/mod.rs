//! TLS on both listeners (`--tls-cert`, `--tls-key`, and `--tls-client-ca` for mutual TLS): the
//! PEM files loaded into rustls server configurations, and swapped on SIGHUP. Each new
//! connection takes the configuration in force when it arrives; connections already open keep
//! the one they started with, so a rotation drops nothing.
//!
//! - `accept`: the handshake, off the accept loop, and the answer to plain HTTP on a TLS port.
//!
//! With `--tls-client-ca`, a client that presents a certificate must present one the CA signed
//! and that is valid now, or the handshake fails. A client that presents none still completes
//! the handshake, because kubelet's HTTPS probes send no certificate; the protocols then refuse
//! it everywhere but the health probes (see [`Peer::client_certificate`]).

pub mod accept;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

pub use accept::{Peer, TlsListener};

/// The PEM files a TLS listener serves with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// `--tls-cert`: the server's certificate chain, leaf first.
    pub cert: PathBuf,
    /// `--tls-key`: the leaf's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// `--tls-client-ca`: the CA certificates client certificates must chain to.
    pub client_ca: Option<PathBuf>,
}

/// Which application protocols a listener's handshakes offer (ALPN, RFC 7301).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// The HTTP port: HTTP/2 and HTTP/1.1.
    Http,
    /// The gRPC port: HTTP/2 only (gRPC needs it).
    Grpc,
}

impl Alpn {
    fn protocols(self) -> Vec<Vec<u8>> {
        match self {
            Alpn::Http => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            Alpn::Grpc => vec![b"h2".to_vec()],
        }
    }
}

/// The configurations new connections take, one per listener.
struct Configs {
    http: Arc<ServerConfig>,
    grpc: Arc<ServerConfig>,
}

/// The server's certificates: loaded at start-up, re-read on SIGHUP.
pub struct Certificates {
    files: TlsFiles,
    current: RwLock<Arc<Configs>>,
}

impl Certificates {
    /// Load the files; an error names the flag and the file that is wrong.
    pub fn load(files: TlsFiles) -> Result<Self, String> {
        let configs = build_configs(&files)?;
        Ok(Self {
            files,
            current: RwLock::new(Arc::new(configs)),
        })
    }

    /// Re-read the files (SIGHUP). On error the certificates in force stay as they were.
    pub fn reload(&self) -> Result<(), String> {
        let configs = build_configs(&self.files)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(configs);
        Ok(())
    }

    /// What a connection arriving now on `alpn`'s listener is served with.
    pub fn config(&self, alpn: Alpn) -> Arc<ServerConfig> {
        let configs = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match alpn {
            Alpn::Http => configs.http.clone(),
            Alpn::Grpc => configs.grpc.clone(),
        }
    }

    /// `--tls-client-ca` was given: requests must come with a client certificate.
    pub fn requires_client_certificate(&self) -> bool {
        self.files.client_ca.is_some()
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }
}

/// Both listeners' configurations from one reading of the files.
fn build_configs(files: &TlsFiles) -> Result<Configs, String> {
    // ring, not rustls' default aws-lc-rs: aws-lc-rs needs cmake and a C toolchain to build.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = read_certificates(&files.cert, "--tls-cert")?;
    let key = read_key(&files.key)?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = match &files.client_ca {
        Some(path) => builder.with_client_cert_verifier(client_verifier(path, provider)?),
        None => builder.with_no_client_auth(),
    };
    // rustls checks here that the key belongs to the leaf certificate.
    let http = builder.with_single_cert(chain, key).map_err(|e| {
        let why = match e {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                "the key does not belong to the certificate (the first one in the file)".to_owned()
            }
            e => e.to_string(),
        };
        format!(
            "--tls-cert {} with --tls-key {}: {why}",
            files.cert.display(),
            files.key.display()
        )
    })?;
    Ok(Configs {
        http: Arc::new(with_alpn(http.clone(), Alpn::Http)),
        grpc: Arc::new(with_alpn(http, Alpn::Grpc)),
    })
}

fn with_alpn(mut config: ServerConfig, alpn: Alpn) -> ServerConfig {
    config.alpn_protocols = alpn.protocols();
    config
}

/// Verify client certificates against the CAs in `path`, but let clients without one finish
/// the handshake (probes); the protocols refuse those (see the module's documentation).
fn client_verifier(
    path: &Path,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, String> {
    let mut roots = RootCertStore::empty();
    for cert in read_certificates(path, "--tls-client-ca")? {
        roots
            .add(cert)
            .map_err(|e| format!("--tls-client-ca {}: {e}", path.display()))?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .allow_unauthenticated()
        .build()
        .map_err(|e| format!("--tls-client-ca {}: {e}", path.display()))
}

/// Every `CERTIFICATE` block of a PEM file; none is an error.
fn read_certificates(path: &Path, flag: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read(path, flag)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{flag} {}: no certificate found (expected PEM blocks `-----BEGIN CERTIFICATE-----`)",
            path.display()
        ));
    }
    Ok(certs)
}

/// The first private key of a PEM file (`PRIVATE KEY`, `RSA PRIVATE KEY` or `EC PRIVATE KEY`).
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = read(path, "--tls-key")?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => format!(
            "--tls-key {}: no private key found (expected a PEM block `-----BEGIN PRIVATE KEY-----`, \
             `RSA PRIVATE KEY` or `EC PRIVATE KEY`)",
            path.display()
        ),
        e => format!("--tls-key {}: {e}", path.display()),
    })
}

fn read(path: &Path, flag: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
}

/// Re-read the certificate files on every SIGHUP, for as long as the server runs. Each SIGHUP
/// reaches every listener of it, so this runs beside `auth::reload_on_sighup`.
#[cfg(unix)]
pub async fn reload_on_sighup(certificates: Arc<Certificates>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP: TLS certificates are read once");
            return;
        }
    };
    while hangups.recv().await.is_some() {
        let files = certificates.files();
        match certificates.reload() {
            Ok(()) => tracing::info!(
                cert = %files.cert.display(),
                key = %files.key.display(),
                "TLS certificates reloaded; new connections use them"
            ),
            Err(e) => tracing::error!(
                error = %e,
                "TLS certificates not reloaded; the previous ones stay in force"
            ),
        }
    }
}

#[cfg(not(unix))]
pub async fn reload_on_sighup(_certificates: Arc<Certificates>) {}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tls")
            .join(name)
    }

    fn files(cert: &str, key: &str, client_ca: Option<&str>) -> TlsFiles {
        TlsFiles {
            cert: fixture(cert),
            key: fixture(key),
            client_ca: client_ca.map(fixture),
        }
    }

    #[test]
    fn loads_and_offers_the_listeners_protocols() {
        let certificates = Certificates::load(files("cert.pem", "key.pem", None)).unwrap();
        assert!(!certificates.requires_client_certificate());
        assert_eq!(
            certificates.config(Alpn::Http).alpn_protocols,
            [b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        assert_eq!(
            certificates.config(Alpn::Grpc).alpn_protocols,
            [b"h2".to_vec()]
        );
        let mutual = Certificates::load(files("cert.pem", "key.pem", Some("cert.pem"))).unwrap();
        assert!(mutual.requires_client_certificate());
    }

    #[test]
    fn errors_name_the_flag_and_the_file() {
        let missing = Certificates::load(files("absent.pem", "key.pem", None))
            .err()
            .unwrap();
        assert!(
            missing.starts_with("--tls-cert ") && missing.contains("absent.pem"),
            "{missing}"
        );
        // A key given as the certificate: no CERTIFICATE block.
        let no_cert = Certificates::load(files("key.pem", "key.pem", None))
            .err()
            .unwrap();
        assert!(
            no_cert.contains("--tls-cert") && no_cert.contains("no certificate"),
            "{no_cert}"
        );
        let no_key = Certificates::load(files("cert.pem", "cert.pem", None))
            .err()
            .unwrap();
        assert!(
            no_key.starts_with("--tls-key") && no_key.contains("no private key"),
            "{no_key}"
        );
        let mismatch = Certificates::load(files("cert.pem", "other-key.pem", None))
            .err()
            .unwrap();
        assert!(
            mismatch.contains("--tls-cert") && mismatch.contains("--tls-key"),
            "{mismatch}"
        );
        assert!(mismatch.contains("does not belong"), "{mismatch}");
        let ca = Certificates::load(files("cert.pem", "key.pem", Some("key.pem")))
            .err()
            .unwrap();
        assert!(ca.starts_with("--tls-client-ca"), "{ca}");
    }

    #[test]
    fn a_failed_reload_keeps_the_configuration_in_force() {
        let dir = std::env::temp_dir().join(format!("visionserve-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        std::fs::copy(fixture("cert.pem"), &cert).unwrap();
        std::fs::copy(fixture("key.pem"), &key).unwrap();
        let certificates = Certificates::load(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: None,
        })
        .unwrap();
        let before = certificates.config(Alpn::Http);
        certificates.reload().unwrap();
        assert!(!Arc::ptr_eq(&before, &certificates.config(Alpn::Http)));

        let in_force = certificates.config(Alpn::Http);
        std::fs::copy(fixture("other-key.pem"), &key).unwrap();
        assert!(certificates.reload().unwrap_err().contains("--tls-key"));
        assert!(Arc::ptr_eq(&in_force, &certificates.config(Alpn::Http)));
        std::fs::remove_file(&cert).unwrap();
        assert!(certificates.reload().unwrap_err().contains("--tls-cert"));
        assert!(Arc::ptr_eq(&in_force, &certificates.config(Alpn::Http)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
