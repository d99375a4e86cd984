//! Server certificates: loading PEM files, choosing by SNI, hot reload, the self-signed
//! certificate made on first start, and the summary of a negotiated session.
//!
//! TLS 1.2 and 1.3 only, with rustls' default (AEAD-only, forward-secret) cipher suites on
//! aws-lc-rs; X25519MLKEM768 is preferred for key exchange.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::smtp::session::TlsInfo;

/// One loaded certificate with the files it came from.
struct Loaded {
    key: Arc<CertifiedKey>,
    files: (PathBuf, PathBuf),
}

/// The live certificate set, swapped whole on reload.
pub struct CertStore {
    inner: RwLock<Vec<Loaded>>,
    stamps: RwLock<Vec<Option<SystemTime>>>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertStore")
    }
}

/// Loads a certificate chain and its key as serving would, checking that they belong together
/// (for `moat config check`).
pub fn check_pair(cert: &Path, key: &Path) -> Result<(), String> {
    load_one(cert, key).map(|_| ())
}

fn load_one(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate found", cert.display()));
    }
    let key_der =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let ck = CertifiedKey::from_der(chain, key_der, &provider)
        .map_err(|e| format!("{} / {}: {e}", cert.display(), key.display()))?;
    Ok(Arc::new(ck))
}

fn mtimes(files: &[(PathBuf, PathBuf)]) -> Vec<Option<SystemTime>> {
    files
        .iter()
        .flat_map(|(c, k)| [c, k])
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

impl CertStore {
    /// Loads every `(cert, key)` pair; the first is the default certificate.
    pub fn load(files: &[(PathBuf, PathBuf)]) -> Result<CertStore, String> {
        let mut loaded = Vec::new();
        for (c, k) in files {
            loaded.push(Loaded {
                key: load_one(c, k)?,
                files: (c.clone(), k.clone()),
            });
        }
        if loaded.is_empty() {
            return Err("no certificate configured".into());
        }
        Ok(CertStore {
            inner: RwLock::new(loaded),
            stamps: RwLock::new(mtimes(files)),
        })
    }

    fn files(&self) -> Vec<(PathBuf, PathBuf)> {
        match self.inner.read() {
            Ok(g) => g.iter().map(|l| l.files.clone()).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Reloads all files; on any error the old set stays in use and the error is returned.
    pub fn reload(&self) -> Result<usize, String> {
        let files = self.files();
        let mut loaded = Vec::new();
        for (c, k) in &files {
            loaded.push(Loaded {
                key: load_one(c, k)?,
                files: (c.clone(), k.clone()),
            });
        }
        let n = loaded.len();
        if let Ok(mut g) = self.inner.write() {
            *g = loaded;
        }
        if let Ok(mut s) = self.stamps.write() {
            *s = mtimes(&files);
        }
        Ok(n)
    }

    /// Reloads when any file's modification time changed since the last load.
    pub fn reload_if_changed(&self) -> Option<Result<usize, String>> {
        let now = mtimes(&self.files());
        let changed = self.stamps.read().map(|s| *s != now).unwrap_or(false);
        changed.then(|| {
            let r = self.reload();
            if r.is_err() {
                // Do not retry a broken file every tick; wait for the next change.
                if let Ok(mut s) = self.stamps.write() {
                    *s = now;
                }
            }
            r
        })
    }

    /// Each loaded certificate's names and `notAfter` (Unix seconds).
    pub fn expiries(&self) -> Vec<(Vec<String>, u64)> {
        let Ok(g) = self.inner.read() else {
            return Vec::new();
        };
        g.iter()
            .filter_map(|l| {
                let ee = l.key.cert.first()?;
                let (_, cert) = x509_parser::parse_x509_certificate(ee.as_ref()).ok()?;
                let not_after = u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0);
                Some((certificate_names(ee.as_ref()), not_after))
            })
            .collect()
    }

    /// The DNS names (and subject CNs) of every loaded certificate, lowercase.
    pub fn names(&self) -> Vec<String> {
        let Ok(g) = self.inner.read() else {
            return Vec::new();
        };
        let mut out: Vec<String> = Vec::new();
        for l in g.iter() {
            if let Some(ee) = l.key.cert.first() {
                for n in certificate_names(ee.as_ref()) {
                    if !out.contains(&n) {
                        out.push(n);
                    }
                }
            }
        }
        out
    }

    fn pick(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let g = self.inner.read().ok()?;
        if let Some(name) = sni.and_then(|n| ServerName::try_from(n.to_string()).ok()) {
            for l in g.iter() {
                let Some(ee) = l.key.cert.first() else {
                    continue;
                };
                let Ok(ee) = webpki::EndEntityCert::try_from(ee) else {
                    continue;
                };
                if ee.verify_is_valid_for_subject_name(&name).is_ok() {
                    return Some(l.key.clone());
                }
            }
        }
        g.first().map(|l| l.key.clone())
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.pick(hello.server_name())
    }
}

/// A listener's rustls server configuration. With `client_roots`, clients are asked for a
/// certificate (optional) and one that is sent must chain to those roots.
///
/// `resumption` false: no TLS 1.3 session tickets are sent and no session cache is kept
/// (so no TLS 1.2 session ids either). Exchange Online's outbound servers are known to abort
/// STARTTLS with receivers that send tickets, and an MTA gains almost nothing from resumption,
/// so `smtp` listeners default to this (`tls_session_tickets` in the listener config).
pub fn server_config(
    store: Arc<CertStore>,
    client_roots: Option<rustls::RootCertStore>,
    resumption: bool,
) -> Result<Arc<ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?;
    let config = match client_roots {
        Some(roots) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| format!("client certificate CA: {e}"))?;
            builder
                .with_client_cert_verifier(verifier)
                .with_cert_resolver(store)
        }
        None => builder.with_no_client_auth().with_cert_resolver(store),
    };
    let mut config = config;
    if !resumption {
        config.send_tls13_tickets = 0;
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    }
    Ok(Arc::new(config))
}

/// The platform's CA certificates (rustls-native-certs), or the Mozilla set from
/// webpki-roots when none load.
pub fn system_roots() -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    let loaded = rustls_native_certs::load_native_certs();
    for e in &loaded.errors {
        tracing::warn!(error = %e, "loading system CA certificates");
    }
    let (added, ignored) = roots.add_parsable_certificates(loaded.certs);
    if ignored > 0 {
        tracing::debug!(ignored, "unparsable system CA certificates skipped");
    }
    if added == 0 {
        tracing::warn!("no system CA certificates found; using the built-in Mozilla roots");
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    roots
}

/// Loads PEM CA certificates into a root store.
pub fn load_roots(path: &Path) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        CertificateDer::pem_file_iter(path).map_err(|e| format!("{}: {e}", path.display()))?
    {
        let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no CA certificate found", path.display()));
    }
    Ok(roots)
}

/// The names a certificate is issued to: subject common names and DNS subject alternative
/// names, lowercased.
pub fn certificate_names(der: &[u8]) -> Vec<String> {
    use x509_parser::prelude::*;
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok())
        .map(str::to_ascii_lowercase)
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    names.dedup();
    names
}

/// Makes `cert.pem` / `key.pem` for `hostname` under `dir` unless they exist already.
pub fn ensure_self_signed(dir: &Path, hostname: &str) -> Result<(PathBuf, PathBuf), String> {
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    if cert_path.exists() && key_path.exists() {
        return Ok((cert_path, key_path));
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let fail = |e: rcgen::Error| format!("generating a self-signed certificate: {e}");
    let key = rcgen::KeyPair::generate().map_err(fail)?;
    let mut params = rcgen::CertificateParams::new(vec![hostname.to_string()]).map_err(fail)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, hostname);
    // Ten years from yesterday: long enough not to surprise anyone who runs the default.
    let now = std::time::SystemTime::now();
    params.not_before = (now - std::time::Duration::from_secs(86_400)).into();
    params.not_after = (now + std::time::Duration::from_secs(3650 * 86_400)).into();
    let cert = params.self_signed(&key).map_err(fail)?;
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    std::fs::write(&cert_path, cert.pem()).map_err(|e| format!("{}: {e}", cert_path.display()))?;
    Ok((cert_path, key_path))
}

/// Writes a file readable only by its owner.
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// IANA name of a cipher suite (`TLS_AES_256_GCM_SHA384`), not rustls' enum spelling.
pub fn iana_cipher_name(suite: rustls::CipherSuite) -> String {
    let debug = format!("{suite:?}");
    match debug.strip_prefix("TLS13_") {
        Some(rest) => format!("TLS_{rest}"),
        None => debug,
    }
}

/// Symmetric key bits of a suite, as Postfix prints them (`256/256 bits`).
pub fn cipher_bits(name: &str) -> u16 {
    if name.contains("AES_128") { 128 } else { 256 }
}

/// Protocol version (`TLSv1.3`) and IANA cipher name of a negotiated session, either side.
pub fn version_and_cipher(conn: &rustls::CommonState) -> (String, String) {
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
        Some(v) => format!("{v:?}"),
        None => "unknown".to_string(),
    };
    let cipher = conn
        .negotiated_cipher_suite()
        .map(|s| iana_cipher_name(s.suite()))
        .unwrap_or_else(|| "unknown".into());
    (version, cipher)
}

/// Summary of a negotiated server-side session.
pub fn summarize(conn: &rustls::ServerConnection) -> TlsInfo {
    let (version, cipher) = version_and_cipher(conn);
    TlsInfo {
        bits: cipher_bits(&cipher),
        version,
        cipher,
        key_exchange: conn
            .negotiated_key_exchange_group()
            .map(|g| format!("{:?}", g.name())),
        sni: conn.server_name().map(str::to_string),
        client_names: conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| certificate_names(c))
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iana_names() {
        assert_eq!(
            iana_cipher_name(rustls::CipherSuite::TLS13_AES_256_GCM_SHA384),
            "TLS_AES_256_GCM_SHA384"
        );
        assert_eq!(
            iana_cipher_name(rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256),
            "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"
        );
        assert_eq!(cipher_bits("TLS_AES_128_GCM_SHA256"), 128);
        assert_eq!(cipher_bits("TLS_CHACHA20_POLY1305_SHA256"), 256);
    }

    #[test]
    fn self_signed_made_once_and_sni_default() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = ensure_self_signed(dir.path(), "mx.example.test").unwrap();
        let first = std::fs::read(&c).unwrap();
        ensure_self_signed(dir.path(), "mx.example.test").unwrap();
        assert_eq!(first, std::fs::read(&c).unwrap());
        let store = CertStore::load(&[(c, k)]).unwrap();
        assert!(store.pick(Some("mx.example.test")).is_some());
        assert!(
            store.pick(Some("other.test")).is_some(),
            "falls back to the default"
        );
        assert!(store.reload_if_changed().is_none());
    }
}
