//! DKIM signing (RFC 6376) with RSA-SHA256 or Ed25519-SHA256 (RFC 8463), for the TLS-RPT
//! reports Moat sends: RFC 8460 §3 requires report mail to be DKIM-signed.
//!
//! Signing only, with `c=relaxed/relaxed` (§3.4.2, §3.4.4), so that the usual rewrapping of
//! header fields and trailing whitespace on the way does not break the signature. Keys are
//! PKCS#8 PEM files as `moat dkim generate` writes them (or `openssl genpkey` does).

use std::path::Path;

use aws_lc_rs::digest;
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair, RSA_PKCS1_SHA256, RsaKeyPair};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;

/// The header fields signed when present (RFC 6376 §5.4: at least From). `From` is listed once
/// more at the end of `h=` than it occurs (§5.4.2, "oversigning"), so that a From added on the
/// way breaks the signature instead of being shown as the signed one.
const SIGNED: &[&str] = &[
    "From",
    "To",
    "Cc",
    "Reply-To",
    "Subject",
    "Date",
    "Message-ID",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "TLS-Report-Domain",
    "TLS-Report-Submitter",
    "TLS-Required",
];

/// Header lines are folded to stay below this many characters (RFC 5322 §2.1.1: 78 with CRLF).
const LINE: usize = 77;

/// The kind of signing key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    /// RSA (`a=rsa-sha256`, `k=rsa`); 2048 bits from [`generate`].
    Rsa,
    /// Ed25519 (`a=ed25519-sha256`, `k=ed25519`, RFC 8463).
    Ed25519,
}

impl KeyType {
    /// The `k=` value of the key record (RFC 6376 §3.6.1).
    pub fn name(self) -> &'static str {
        match self {
            KeyType::Rsa => "rsa",
            KeyType::Ed25519 => "ed25519",
        }
    }
}

enum Key {
    Rsa(RsaKeyPair),
    Ed25519(Ed25519KeyPair),
}

/// Signs messages as `d=DOMAIN`, `s=SELECTOR` with one private key.
pub struct Signer {
    domain: String,
    selector: String,
    key: Key,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("domain", &self.domain)
            .field("selector", &self.selector)
            .field("key_type", &self.key_type())
            .finish()
    }
}

impl Signer {
    /// Loads a PEM private key: PKCS#8 (`PRIVATE KEY`, RSA or Ed25519) or PKCS#1
    /// (`RSA PRIVATE KEY`). Errors name the file.
    pub fn from_pem_file(path: &Path, domain: &str, selector: &str) -> Result<Signer, String> {
        let fail = |e: String| format!("DKIM key {}: {e}", path.display());
        let pem = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
        let der = PrivateKeyDer::from_pem_slice(&pem)
            .map_err(|e| fail(format!("no PEM private key in the file ({e})")))?;
        match der {
            PrivateKeyDer::Pkcs8(k) => {
                Signer::from_pkcs8_der(k.secret_pkcs8_der(), domain, selector)
            }
            PrivateKeyDer::Pkcs1(k) => RsaKeyPair::from_der(k.secret_pkcs1_der())
                .map_err(|e| format!("not a usable RSA key: {e}"))
                .and_then(|k| Signer::new(Key::Rsa(k), domain, selector)),
            PrivateKeyDer::Sec1(_) => {
                Err("an EC (SEC1) key; DKIM signs with RSA or Ed25519 only".to_string())
            }
            _ => Err("an unknown kind of private key".to_string()),
        }
        .map_err(fail)
    }

    /// A PKCS#8 DER private key, RSA or Ed25519 (v1 or v2).
    pub fn from_pkcs8_der(der: &[u8], domain: &str, selector: &str) -> Result<Signer, String> {
        let key = match RsaKeyPair::from_pkcs8(der) {
            Ok(k) => Key::Rsa(k),
            Err(rsa) => match Ed25519KeyPair::from_pkcs8(der) {
                Ok(k) => Key::Ed25519(k),
                Err(_) => {
                    return Err(format!(
                        "not an RSA (2048 to 8192 bits) or Ed25519 private key ({rsa})"
                    ));
                }
            },
        };
        Signer::new(key, domain, selector)
    }

    fn new(key: Key, domain: &str, selector: &str) -> Result<Signer, String> {
        check_names(domain, selector)?;
        Ok(Signer {
            domain: domain.trim_end_matches('.').to_ascii_lowercase(),
            selector: selector.to_ascii_lowercase(),
            key,
        })
    }

    /// The kind of key this signer holds.
    pub fn key_type(&self) -> KeyType {
        match self.key {
            Key::Rsa(_) => KeyType::Rsa,
            Key::Ed25519(_) => KeyType::Ed25519,
        }
    }

    /// The `DKIM-Signature:` header field for `message` (header, blank line, body; bare LF is
    /// taken as CRLF), folded, ending in CRLF, to be put in front of the message as it is.
    /// `now_unix` is the `t=` signing time. Errors: no From field, a malformed header.
    ///
    /// The hash (RFC 6376 §3.7): the relaxed-canonical fields named in `h=`, each chosen from
    /// the bottom up (§5.4.2), then this field itself with an empty `b=` and no final CRLF.
    /// RSA signs that with PKCS#1 v1.5 and SHA-256; Ed25519 signs its SHA-256 digest (RFC
    /// 8463 §3).
    pub fn sign(&self, message: &[u8], now_unix: u64) -> Result<String, String> {
        let message = crlf(message);
        let (fields, body) = split(&message)?;
        let mut names: Vec<&str> = Vec::new();
        for name in SIGNED {
            let n = fields.iter().filter(|f| f.is(name)).count();
            names.extend(std::iter::repeat_n(*name, n));
        }
        if !names.contains(&"From") {
            return Err("the message has no From header field (RFC 6376 §5.4)".into());
        }
        names.push("From");

        let body_hash = B64.encode(digest::digest(&digest::SHA256, &relaxed_body(body)));
        let algorithm = match self.key {
            Key::Rsa(_) => "rsa-sha256",
            Key::Ed25519(_) => "ed25519-sha256",
        };
        let mut out = Folder::new("DKIM-Signature:");
        for tag in [
            "v=1;".to_string(),
            format!("a={algorithm};"),
            "c=relaxed/relaxed;".to_string(),
            format!("d={};", self.domain),
            format!("s={};", self.selector),
            format!("t={now_unix};"),
        ] {
            out.word(" ", &tag);
        }
        // h= folds after a colon (FWS is allowed there, §3.5).
        for (i, name) in names.iter().enumerate() {
            let start = if i == 0 { "h=" } else { "" };
            let end = if i + 1 == names.len() { ";" } else { ":" };
            out.word(
                if i == 0 { " " } else { "" },
                &format!("{start}{name}{end}"),
            );
        }
        out.word(" ", &format!("bh={body_hash};"));
        out.break_line();
        out.word(" ", "b=");

        let mut data = Vec::new();
        for (name, field) in selected(&fields, &names) {
            data.extend_from_slice(&relaxed_header(name, field));
        }
        let value = out.text.strip_prefix("DKIM-Signature:").unwrap_or_default();
        let unsigned = relaxed_header("DKIM-Signature", value.as_bytes());
        data.extend_from_slice(&unsigned[..unsigned.len() - 2]);

        let signature = match &self.key {
            Key::Rsa(k) => {
                let mut sig = vec![0; k.public_modulus_len()];
                k.sign(&RSA_PKCS1_SHA256, &SystemRandom::new(), &data, &mut sig)
                    .map_err(|_| "RSA signing failed".to_string())?;
                sig
            }
            Key::Ed25519(k) => k
                .sign(digest::digest(&digest::SHA256, &data).as_ref())
                .as_ref()
                .to_vec(),
        };
        out.split_word(&B64.encode(signature));
        out.text.push_str("\r\n");
        Ok(out.text)
    }
}

/// Checks that a domain and selector can stand in `d=`, `s=` and a DNS name: dot-separated
/// labels of letters, digits, `-` and `_` (A-labels for international names).
pub fn check_names(domain: &str, selector: &str) -> Result<(), String> {
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            })
    };
    if !ok(domain.trim_end_matches('.')) {
        return Err(format!(
            "`{domain}` is not a domain name (use the A-label form)"
        ));
    }
    if !ok(selector) {
        return Err(format!(
            "`{selector}` is not a selector (labels of letters, digits, `-`, `_`)"
        ));
    }
    Ok(())
}

/// Makes a key pair: the private key as PKCS#8 PEM and the `p=` value of its key record. RSA
/// is 2048 bits and `p=` its SubjectPublicKeyInfo (RFC 6376 §3.6.1); Ed25519's `p=` is the
/// bare 32-byte public key (RFC 8463 §4.2).
pub fn generate(kind: KeyType) -> Result<(String, String), String> {
    let fail = |_| format!("generating the {} key failed", kind.name());
    let (pkcs8, public) = match kind {
        KeyType::Rsa => {
            let key = RsaKeyPair::generate(KeySize::Rsa2048).map_err(fail)?;
            let pkcs8 = key.as_der().map_err(fail)?.as_ref().to_vec();
            let spki = key.public_key().as_der().map_err(fail)?.as_ref().to_vec();
            (pkcs8, spki)
        }
        KeyType::Ed25519 => {
            let key = Ed25519KeyPair::generate().map_err(fail)?;
            // v1 (RFC 5208), the form OpenSSL writes and every tool reads.
            let pkcs8 = key.to_pkcs8v1().map_err(fail)?.as_ref().to_vec();
            (pkcs8, key.public_key().as_ref().to_vec())
        }
    };
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    let b64 = B64.encode(pkcs8);
    for chunk in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(chunk));
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    Ok((pem, B64.encode(public)))
}

/// The key record to publish, in zone-file form: `SELECTOR._domainkey.DOMAIN. IN TXT "..."`,
/// the value cut into strings of at most 255 octets (RFC 6376 §3.6.2.2). `s=tlsrpt` restricts
/// the key to TLS reports, as RFC 8460 §3 asks of report signers.
pub fn dns_record(selector: &str, domain: &str, kind: KeyType, p: &str) -> String {
    let value = format!("v=DKIM1; k={}; s=tlsrpt; p={p}", kind.name());
    let strings: Vec<String> = value
        .as_bytes()
        .chunks(255)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect();
    format!(
        "{selector}._domainkey.{}. IN TXT {}",
        domain.trim_end_matches('.'),
        strings.join(" ")
    )
}

/// One header field: its name (as written, before the colon) and the rest, folding included,
/// without the final CRLF.
struct Field<'a> {
    name: &'a [u8],
    value: &'a [u8],
}

impl Field<'_> {
    fn is(&self, name: &str) -> bool {
        trim_wsp_end(self.name).eq_ignore_ascii_case(name.as_bytes())
    }
}

/// `message` with every LF not preceded by CR made CRLF.
fn crlf(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 64);
    let mut prev = 0u8;
    for &b in message {
        if b == b'\n' && prev != b'\r' {
            out.push(b'\r');
        }
        out.push(b);
        prev = b;
    }
    out
}

/// The header fields and the body of a CRLF message. No blank line: all header, empty body.
fn split(message: &[u8]) -> Result<(Vec<Field<'_>>, &[u8]), String> {
    let (head, body) = match message.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => (&message[..i + 2], &message[i + 4..]),
        None if message.starts_with(b"\r\n") => (&message[..0], &message[2..]),
        None => (message, &message[message.len()..]),
    };
    if head.is_empty() || message.starts_with(b"\r\n") {
        return Err("the message has no header".into());
    }
    let mut fields: Vec<Field> = Vec::new();
    let mut start = 0;
    let mut lines = Vec::new();
    while start < head.len() {
        let end = head[start..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map_or(head.len(), |i| start + i);
        lines.push((start, end));
        start = end + 2;
    }
    let mut i = 0;
    while i < lines.len() {
        let (first, mut last) = lines[i];
        if matches!(head[first], b' ' | b'\t') {
            return Err("the header starts with a continuation line".into());
        }
        while i + 1 < lines.len() && matches!(head.get(lines[i + 1].0), Some(b' ' | b'\t')) {
            i += 1;
            last = lines[i].1;
        }
        let raw = &head[first..last];
        let colon = raw.iter().position(|&b| b == b':').ok_or_else(|| {
            format!(
                "a header line without a colon: {}",
                String::from_utf8_lossy(&raw[..raw.len().min(60)])
            )
        })?;
        fields.push(Field {
            name: &raw[..colon],
            value: &raw[colon + 1..],
        });
        i += 1;
    }
    Ok((fields, body))
}

/// The fields `h=` names, in its order: the n-th use of a name takes the n-th instance from
/// the bottom; a name used more often than it occurs selects nothing (RFC 6376 §5.4.2).
fn selected<'a>(fields: &'a [Field<'a>], names: &[&'a str]) -> Vec<(&'a str, &'a [u8])> {
    let mut used: Vec<(&str, usize)> = Vec::new();
    let mut out = Vec::new();
    for &name in names {
        let n = match used.iter_mut().find(|(u, _)| u.eq_ignore_ascii_case(name)) {
            Some((_, n)) => {
                *n += 1;
                *n - 1
            }
            None => {
                used.push((name, 1));
                0
            }
        };
        if let Some(f) = fields.iter().rev().filter(|f| f.is(name)).nth(n) {
            out.push((name, f.value));
        }
    }
    out
}

fn is_wsp(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn trim_wsp_end(s: &[u8]) -> &[u8] {
    let end = s.iter().rposition(|&b| !is_wsp(b)).map_or(0, |i| i + 1);
    &s[..end]
}

/// Runs of WSP made one SP, WSP at both ends removed.
fn squeeze(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut space = false;
    for &b in s {
        if is_wsp(b) {
            space = true;
        } else {
            if space && !out.is_empty() {
                out.push(b' ');
            }
            space = false;
            out.push(b);
        }
    }
    out
}

/// Relaxed header canonicalisation (RFC 6376 §3.4.2): `name:value` CRLF with the name in
/// lower case, the value unfolded, WSP runs made one SP, no WSP at its ends or around the
/// colon.
fn relaxed_header(name: &str, value: &[u8]) -> Vec<u8> {
    let unfolded: Vec<u8> = value
        .iter()
        .copied()
        .filter(|&b| b != b'\r' && b != b'\n')
        .collect();
    let mut out = trim_wsp_end(name.as_bytes()).to_ascii_lowercase();
    out.push(b':');
    out.extend_from_slice(&squeeze(&unfolded));
    out.extend_from_slice(b"\r\n");
    out
}

/// Relaxed body canonicalisation (RFC 6376 §3.4.4): per line WSP runs made one SP and WSP at
/// its end removed; empty lines at the end removed; every line ends in CRLF. An empty body
/// (or one of only empty lines) is the empty string, unlike "simple"'s CRLF.
fn relaxed_body(body: &[u8]) -> Vec<u8> {
    let mut lines: Vec<Vec<u8>> = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let (line, next) = match rest.windows(2).position(|w| w == b"\r\n") {
            Some(i) => (&rest[..i], &rest[i + 2..]),
            None => (rest, &rest[rest.len()..]),
        };
        let mut l = Vec::with_capacity(line.len());
        let mut space = false;
        for &b in line {
            if is_wsp(b) {
                space = true;
            } else {
                if space {
                    l.push(b' ');
                }
                space = false;
                l.push(b);
            }
        }
        lines.push(l);
        rest = next;
    }
    while lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    let mut out = Vec::with_capacity(body.len());
    for l in lines {
        out.extend_from_slice(&l);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Builds a header field folded before [`LINE`] characters.
struct Folder {
    text: String,
    column: usize,
}

impl Folder {
    fn new(start: &str) -> Folder {
        Folder {
            text: start.to_string(),
            column: start.len(),
        }
    }

    /// Appends `glue` then `word`, or a fold (CRLF SP) then `word` when the line would be too
    /// long. A word longer than a line stands on its own line.
    fn word(&mut self, glue: &str, word: &str) {
        if self.column + glue.len() + word.len() <= LINE {
            self.text.push_str(glue);
            self.text.push_str(word);
            self.column += glue.len() + word.len();
        } else {
            self.break_line();
            self.text.push(' ');
            self.text.push_str(word);
            self.column = 1 + word.len();
        }
    }

    /// Appends a fold so that the next word starts a line.
    fn break_line(&mut self) {
        self.text.push_str("\r\n");
        self.column = 0;
    }

    /// Appends `s` (base64, where FWS may stand anywhere) filling lines, folding inside it.
    fn split_word(&mut self, s: &str) {
        let mut rest = s;
        while !rest.is_empty() {
            let room = LINE.saturating_sub(self.column);
            if room == 0 {
                self.text.push_str("\r\n ");
                self.column = 1;
                continue;
            }
            let (now, later) = rest.split_at(room.min(rest.len()));
            self.text.push_str(now);
            self.column += now.len();
            rest = later;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::signature::{ED25519, RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};

    const REPORT: &[u8] = b"From: TLS reports <tlsrpt@example.net>\r\n\
To: tlsrpt@example.com\r\n\
Subject: Report Domain: example.com\r\n\
    Submitter: example.net\r\n\
Date: Tue, 1 Apr 2025 00:00:00 +0000\r\n\
Message-ID: <r1@example.net>\r\n\
TLS-Report-Domain: example.com\r\n\
TLS-Report-Submitter: example.net\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=tlsrpt;\r\n\
\tboundary=\"b1\"\r\n\
\r\n\
--b1\r\n\
Content-Type: text/plain\r\n\
\r\n\
A report.  \r\n\
--b1--\r\n\
\r\n\
\r\n";

    fn keys(kind: KeyType) -> (Signer, Vec<u8>) {
        let (pem, p) = generate(kind).unwrap();
        let der = PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap();
        let signer = Signer::from_pkcs8_der(der.secret_der(), "example.net", "sel").unwrap();
        assert_eq!(signer.key_type(), kind);
        (signer, B64.decode(p).unwrap())
    }

    /// The tags of a DKIM-Signature value, FWS removed from each value.
    fn tags(value: &str) -> Vec<(String, String)> {
        value
            .split(';')
            .filter(|t| !t.trim().is_empty())
            .map(|t| {
                let (k, v) = t.split_once('=').unwrap();
                (
                    k.trim().to_string(),
                    v.chars().filter(|c| !c.is_whitespace()).collect(),
                )
            })
            .collect()
    }

    fn tag<'a>(tags: &'a [(String, String)], name: &str) -> &'a str {
        &tags.iter().find(|(k, _)| k == name).unwrap().1
    }

    /// A verifier written from RFC 6376 §6.1 for these tests: the first field of `signed` is
    /// the signature; Ok when both the body hash and the signature hold.
    fn verify(signed: &[u8], kind: KeyType, public: &[u8]) -> Result<(), &'static str> {
        let signed = crlf(signed);
        let (fields, body) = split(&signed).map_err(|_| "split")?;
        let sig = &fields[0];
        assert!(sig.is("DKIM-Signature"));
        let value = std::str::from_utf8(sig.value).unwrap();
        let t = tags(value);
        let bh = B64.encode(digest::digest(&digest::SHA256, &relaxed_body(body)));
        if bh != tag(&t, "bh") {
            return Err("body hash");
        }
        let names: Vec<&str> = tag(&t, "h").split(':').collect();
        let mut data = Vec::new();
        for (name, v) in selected(&fields[1..], &names) {
            data.extend_from_slice(&relaxed_header(name, v));
        }
        // The value with b='s value emptied (it is the last tag, and base64 has no `;`).
        let semi = value.rfind(';').unwrap();
        let b_at = semi + value[semi..].find("b=").unwrap();
        let empty = format!("{}b=", &value[..b_at]);
        let unsigned = relaxed_header("DKIM-Signature", empty.as_bytes());
        data.extend_from_slice(&unsigned[..unsigned.len() - 2]);
        let b = B64.decode(tag(&t, "b")).map_err(|_| "b64")?;
        let ok = match kind {
            KeyType::Rsa => {
                UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, public).verify(&data, &b)
            }
            KeyType::Ed25519 => UnparsedPublicKey::new(&ED25519, public)
                .verify(digest::digest(&digest::SHA256, &data).as_ref(), &b),
        };
        ok.map_err(|_| "signature")
    }

    #[test]
    fn rfc6376_example_relaxed() {
        // RFC 6376 §3.4.5.
        let m = b"A: X\r\nB : Y\t\r\n\tZ  \r\n\r\n C \r\nD \t E\r\n\r\n\r\n";
        let (fields, body) = split(m).unwrap();
        let names: Vec<&str> = fields
            .iter()
            .map(|f| std::str::from_utf8(f.name).unwrap())
            .collect();
        let head: Vec<u8> = fields
            .iter()
            .zip(&names)
            .flat_map(|(f, n)| relaxed_header(n, f.value))
            .collect();
        assert_eq!(head, b"a:X\r\nb:Y Z\r\n");
        assert_eq!(relaxed_body(body), b" C\r\nD E\r\n");
    }

    #[test]
    fn body_edge_cases() {
        assert_eq!(relaxed_body(b""), b"");
        assert_eq!(relaxed_body(b"\r\n"), b"");
        assert_eq!(relaxed_body(b"\r\n\r\n \t\r\n"), b"");
        assert_eq!(relaxed_body(b"a\r\n\r\n\r\n"), b"a\r\n");
        assert_eq!(relaxed_body(b"a \r\n\r\nb\t\r\n\r\n"), b"a\r\n\r\nb\r\n");
        // A last line without CRLF gets one.
        assert_eq!(relaxed_body(b"a\r\nb"), b"a\r\nb\r\n");
        // The well-known hash of the empty relaxed body.
        assert_eq!(
            B64.encode(digest::digest(&digest::SHA256, &relaxed_body(b""))),
            "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
        );
    }

    #[test]
    fn header_edge_cases() {
        assert_eq!(
            relaxed_header("Subject ", b"  a\r\n\t b  "),
            b"subject:a b\r\n"
        );
        assert_eq!(relaxed_header("X", b""), b"x:\r\n");
        assert_eq!(crlf(b"a\nb\r\nc\n"), b"a\r\nb\r\nc\r\n");
        assert!(split(b"\r\nbody").is_err());
        assert!(split(b" cont: x\r\n\r\n").is_err());
        assert!(split(b"nocolon\r\n\r\n").is_err());
        // No blank line: all header.
        let (f, body) = split(b"From: a\r\n").unwrap();
        assert_eq!((f.len(), body), (1, &b""[..]));
    }

    #[test]
    fn bottom_up_selection() {
        let (fields, _) = split(b"X: 1\r\nY: y\r\nX: 2\r\n\r\n").unwrap();
        let got: Vec<&[u8]> = selected(&fields, &["X", "X", "X", "Y"])
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        assert_eq!(got, [&b" 2"[..], b" 1", b" y"]);
    }

    #[test]
    fn signs_and_verifies_both_kinds() {
        for kind in [KeyType::Rsa, KeyType::Ed25519] {
            let (signer, public) = keys(kind);
            let header = signer.sign(REPORT, 1_700_000_000).unwrap();
            assert!(header.starts_with("DKIM-Signature: v=1; a="));
            assert!(header.ends_with("\r\n") && !header.ends_with("\r\n\r\n"));
            for line in header.trim_end_matches("\r\n").split("\r\n") {
                assert!(line.len() < 78, "{line:?}");
            }
            for line in header.split("\r\n").skip(1).filter(|l| !l.is_empty()) {
                assert!(line.starts_with(' '), "{line:?}");
            }
            let t = tags(header.trim_start_matches("DKIM-Signature:"));
            let algorithm = if kind == KeyType::Rsa {
                "rsa-sha256"
            } else {
                "ed25519-sha256"
            };
            assert_eq!(tag(&t, "a"), algorithm);
            assert_eq!(tag(&t, "c"), "relaxed/relaxed");
            assert_eq!(tag(&t, "d"), "example.net");
            assert_eq!(tag(&t, "s"), "sel");
            assert_eq!(tag(&t, "t"), "1700000000");
            assert_eq!(
                tag(&t, "h"),
                "From:To:Subject:Date:Message-ID:MIME-Version:Content-Type:\
                 TLS-Report-Domain:TLS-Report-Submitter:From"
            );
            let signed = [header.as_bytes(), REPORT].concat();
            verify(&signed, kind, &public).unwrap();

            // The body, a signed header field, a second From: each breaks it.
            let body = String::from_utf8(signed.clone())
                .unwrap()
                .replace("A report.", "A rep0rt.");
            assert_eq!(verify(body.as_bytes(), kind, &public), Err("body hash"));
            let subject = String::from_utf8(signed.clone())
                .unwrap()
                .replace("Domain: example.com\r\n", "Domain: example.org\r\n");
            assert_eq!(verify(subject.as_bytes(), kind, &public), Err("signature"));
            let from = String::from_utf8(signed.clone()).unwrap().replace(
                "MIME-Version: 1.0",
                "From: other@example.org\r\nMIME-Version: 1.0",
            );
            assert_eq!(verify(from.as_bytes(), kind, &public), Err("signature"));

            // Relaxed: refolding, extra whitespace, trailing blank lines, LF line ends.
            let loose = String::from_utf8(signed.clone())
                .unwrap()
                .replace("To: tlsrpt@example.com", "To:   tlsrpt@example.com \t")
                .replace("report-type=tlsrpt;\r\n\t", "report-type=tlsrpt; ")
                .replace("A report.", "A   report.\t")
                + "\r\n\r\n";
            verify(loose.as_bytes(), kind, &public).unwrap();
            verify(loose.replace("\r\n", "\n").as_bytes(), kind, &public).unwrap();

            // An unrelated field added does not matter.
            let extra = [header.as_bytes(), b"Received: x\r\n", REPORT].concat();
            verify(&extra, kind, &public).unwrap();
        }
    }

    #[test]
    fn sign_needs_a_from() {
        let (signer, _) = keys(KeyType::Ed25519);
        let err = signer.sign(b"To: a@b\r\n\r\nx\r\n", 0).unwrap_err();
        assert!(err.contains("From"), "{err}");
        // An empty body is fine.
        assert!(signer.sign(b"From: a@b\r\n\r\n", 0).is_ok());
        assert!(signer.sign(b"From: a@b\r\n", 0).is_ok());
    }

    #[test]
    fn names_are_checked() {
        let (pem, _) = generate(KeyType::Ed25519).unwrap();
        let der = PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap();
        for (d, s) in [("exa mple.com", "s"), ("example.com", "a;b"), ("", "s")] {
            assert!(Signer::from_pkcs8_der(der.secret_der(), d, s).is_err());
        }
        let s = Signer::from_pkcs8_der(der.secret_der(), "Example.COM.", "s_1.x").unwrap();
        assert_eq!(s.domain, "example.com");
        assert!(Signer::from_pkcs8_der(b"junk", "example.com", "s").is_err());
    }

    #[test]
    fn pem_files() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.pem");
        let err = Signer::from_pem_file(&missing, "example.com", "s").unwrap_err();
        assert!(err.contains("none.pem"), "{err}");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a key\n").unwrap();
        let err = Signer::from_pem_file(&junk, "example.com", "s").unwrap_err();
        assert!(err.contains("junk.pem"), "{err}");
        for kind in [KeyType::Rsa, KeyType::Ed25519] {
            let (pem, _) = generate(kind).unwrap();
            let path = dir.path().join("k.pem");
            std::fs::write(&path, pem).unwrap();
            let s = Signer::from_pem_file(&path, "example.com", "s").unwrap();
            assert_eq!(s.key_type(), kind);
        }
    }

    #[test]
    fn pkcs1_rsa_key() {
        // PKCS#8 wraps the PKCS#1 RSAPrivateKey in an OCTET STRING; unwrap it to make the
        // `RSA PRIVATE KEY` form older OpenSSL writes.
        let (pem, p) = generate(KeyType::Rsa).unwrap();
        let der = PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap();
        let pkcs8 = der.secret_der();
        let at = pkcs8.windows(2).rposition(|w| w == [0x04, 0x82]).unwrap();
        let len = usize::from(pkcs8[at + 2]) << 8 | usize::from(pkcs8[at + 3]);
        let pkcs1 = &pkcs8[at + 4..at + 4 + len];
        let mut pem1 = String::from("-----BEGIN RSA PRIVATE KEY-----\n");
        pem1.push_str(&B64.encode(pkcs1));
        pem1.push_str("\n-----END RSA PRIVATE KEY-----\n");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rsa1.pem");
        std::fs::write(&path, pem1).unwrap();
        let s = Signer::from_pem_file(&path, "example.net", "sel").unwrap();
        assert_eq!(s.key_type(), KeyType::Rsa);
        let header = s.sign(REPORT, 0).unwrap();
        let signed = [header.as_bytes(), REPORT].concat();
        verify(&signed, KeyType::Rsa, &B64.decode(p).unwrap()).unwrap();
    }

    #[test]
    fn record() {
        let (_, p) = generate(KeyType::Rsa).unwrap();
        let r = dns_record("sel", "example.com.", KeyType::Rsa, &p);
        let (name, strings) = r.split_once(" IN TXT ").unwrap();
        assert_eq!(name, "sel._domainkey.example.com.");
        let parts: Vec<&str> = strings
            .split('"')
            .enumerate()
            .filter(|(i, _)| i % 2 == 1)
            .map(|(_, s)| s)
            .collect();
        assert!(parts.len() >= 2 && parts.iter().all(|s| s.len() <= 255));
        assert_eq!(parts.concat(), format!("v=DKIM1; k=rsa; s=tlsrpt; p={p}"));
        let (_, p) = generate(KeyType::Ed25519).unwrap();
        assert_eq!(B64.decode(&p).unwrap().len(), 32);
        assert_eq!(
            dns_record("e", "example.com", KeyType::Ed25519, &p),
            format!("e._domainkey.example.com. IN TXT \"v=DKIM1; k=ed25519; s=tlsrpt; p={p}\"")
        );
    }
}
