//! `moat dane tlsa`: the TLSA records a domain owner publishes for the certificates Moat serves
//! on its SMTP listeners (RFC 7672 §3.1: `3 1 1` for the server's own key, `2 1 1` for the
//! issuing CA), under the names they cover, with a live comparison against what DNS publishes
//! now and the steps of a key rollover.

use std::fmt::Write as _;
use std::path::Path;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::tlsa::{DANE_EE, DANE_TA, MATCHING_SHA256, SELECTOR_SPKI, Tlsa};
use crate::policy::TlsaLookup;

/// One served certificate: its file, the names it covers and the records for it.
#[derive(Debug, Clone)]
pub struct Published {
    pub file: String,
    pub names: Vec<String>,
    /// `3 1 1` of the certificate's key.
    pub ee: Tlsa,
    /// `2 1 1` of the issuing CA's key, when the file holds the CA certificate after the
    /// server's own.
    pub ta: Option<Tlsa>,
}

/// The records for the chain in the PEM file `path`.
pub fn for_chain_file(path: &Path) -> Result<Published, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let Some(leaf) = chain.first() else {
        return Err(format!("{}: no certificate in the file", path.display()));
    };
    let ee = Tlsa::for_certificate(DANE_EE, SELECTOR_SPKI, MATCHING_SHA256, leaf.as_ref())
        .ok_or_else(|| format!("{}: the certificate cannot be parsed", path.display()))?;
    let ta = chain
        .get(1)
        .and_then(|ca| Tlsa::for_certificate(DANE_TA, SELECTOR_SPKI, MATCHING_SHA256, ca.as_ref()));
    let names = crate::tls::certificate_names(leaf.as_ref())
        .into_iter()
        // Host names only: not wildcards (a TLSA owner names one host) nor a common name
        // that is not a host name.
        .filter(|n| !n.starts_with("*.") && n.contains('.'))
        .filter(|n| crate::domain::Domain::parse(n).is_ok())
        .collect();
    Ok(Published {
        file: path.display().to_string(),
        names,
        ee,
        ta,
    })
}

/// The report: records per certificate, ready to paste; when `validator` is given, what DNS
/// publishes now for each name and whether the certificate on disk still matches it.
pub async fn report(
    certs: &[Published],
    port: u16,
    validator: Option<&crate::dns::Validator>,
) -> (String, bool) {
    let mut out = String::new();
    let mut ok = true;
    for c in certs {
        let _ = writeln!(out, "Certificate {} ({})", c.file, c.names.join(", "));
        for name in &c.names {
            let _ = writeln!(out, "  _{port}._tcp.{name}. IN TLSA {}", c.ee);
            if let Some(ta) = &c.ta {
                let _ = writeln!(out, "  _{port}._tcp.{name}. IN TLSA {ta}");
            }
        }
        if c.ta.is_none() {
            let _ = writeln!(
                out,
                "  (no issuing CA certificate in the file: only the 3 1 1 record; DANE-TA needs the CA certificate served after the server's own)"
            );
        }
        let Some(v) = validator else { continue };
        for name in &c.names {
            let line = match v.tlsa(name, port).await {
                TlsaLookup::Records { records, base } => {
                    let mine = [Some(&c.ee), c.ta.as_ref()];
                    if records.iter().any(|r| mine.contains(&Some(r))) {
                        format!(
                            "PASS  {name}: DNS publishes a record for this certificate (at {base})"
                        )
                    } else {
                        ok = false;
                        let shown: Vec<String> =
                            records.iter().map(|r| r.short().to_string()).collect();
                        format!(
                            "WARN  {name}: the published TLSA records ({}) match none of this certificate's; senders using DANE will refuse the server until a record for the current key is published",
                            shown.join("; ")
                        )
                    }
                }
                TlsaLookup::NoRecords { secure: true } => {
                    format!("INFO  {name}: no TLSA records published (DANE not in use)")
                }
                TlsaLookup::NoRecords { secure: false } => format!(
                    "INFO  {name}: the zone is not DNSSEC-signed (or not validated here): TLSA records would not be used"
                ),
                TlsaLookup::Failed(w) | TlsaLookup::Unanswered(w) => {
                    ok = false;
                    format!("WARN  {name}: the TLSA lookup failed: {w}")
                }
                TlsaLookup::NotLooked => String::new(),
            };
            if !line.is_empty() {
                let _ = writeln!(out, "  {line}");
            }
        }
    }
    out.push_str(
        "\nRollover (RFC 7671 §8.1): publish the record for the next key beside the current one, wait at least two TTLs of the TLSA RRset, switch the certificate, then remove the old record. With 2 1 1 records a renewal under the same CA needs no DNS change.\n",
    );
    (out, ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_for_a_chain_file() {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["mx.example.test".to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let path = dir.path().join("chain.pem");
        std::fs::write(&path, format!("{}{}", leaf.pem(), ca.pem())).unwrap();
        let p = for_chain_file(&path).unwrap();
        assert_eq!(p.names, vec!["mx.example.test".to_string()]);
        assert_eq!((p.ee.usage, p.ee.selector, p.ee.matching), (3, 1, 1));
        assert!(p.ee.matches(leaf.der()));
        let ta = p.ta.unwrap();
        assert_eq!((ta.usage, ta.selector, ta.matching), (2, 1, 1));
        assert!(ta.matches(ca.der()));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (text, ok) = rt.block_on(report(&[for_chain_file(&path).unwrap()], 25, None));
        assert!(ok);
        assert!(
            text.contains(&format!("_25._tcp.mx.example.test. IN TLSA {}", p.ee)),
            "{text}"
        );
        assert!(text.contains("Rollover"), "{text}");
    }
}
