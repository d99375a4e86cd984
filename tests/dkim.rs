//! DKIM signing checked by an independent verifier: `moat dkim generate` (the real binary)
//! makes RSA and Ed25519 keys and their records, `moat::dkim::Signer` signs a TLS-RPT report
//! mail with them, and dkimpy (Debian's python3-dkim, through `tests/dkim_verify.py`) verifies
//! it with the printed record as the only DNS answer, as a strict RFC 8460 receiver.
//!
//! Also: one changed body byte fails; refolded header fields, extra and trailing whitespace
//! and trailing blank lines still verify (relaxed/relaxed); the key file is 0600 and kept
//! unless --force. dkimpy missing is a failure, not a skip.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use moat::dkim::Signer;

/// A report mail as Moat will send it (RFC 8460 §5.3): multipart/report, gzip attachment.
const REPORT: &str = "From: TLS reporting <tlsrpt-noreply@example.com>\r\n\
To: tlsrpt@example.org\r\n\
Subject: Report Domain: example.org Submitter: example.com\r\n\
 Report-ID: <2025.04.01T00.00.00Z+example.org@example.com>\r\n\
Date: Wed, 02 Apr 2025 00:10:00 +0000\r\n\
Message-ID: <2025.04.01T00.00.00Z+example.org@example.com>\r\n\
TLS-Report-Domain: example.org\r\n\
TLS-Report-Submitter: example.com\r\n\
TLS-Required: No\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=tlsrpt;\r\n\
\tboundary=\"----=_report_1\"\r\n\
\r\n\
This is a multipart message in MIME format.\r\n\
\r\n\
------=_report_1\r\n\
Content-Type: text/plain; charset=us-ascii\r\n\
\r\n\
This is an aggregate TLS report from example.com.\r\n\
\r\n\
------=_report_1\r\n\
Content-Type: application/tlsrpt+gzip\r\n\
Content-Transfer-Encoding: base64\r\n\
Content-Disposition: attachment;\r\n\
\tfilename=\"example.com!example.org!1743465600!1743551999!1.json.gz\"\r\n\
\r\n\
H4sIAAAAAAAAA6tWKkktLlGyUlAqS8wpTVWqBQBO3GN6EwAAAA==\r\n\
\r\n\
------=_report_1--\r\n";

/// `moat dkim generate ARGS`: exit status, stdout, stderr.
fn generate(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_moat"))
        .args(["dkim", "generate"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The TXT value of a zone-file line `NAME. IN TXT "..." "..."`: its strings joined.
fn txt_value(line: &str) -> String {
    let (_, strings) = line.split_once(" IN TXT ").unwrap();
    strings
        .split('"')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, s)| s)
        .collect()
}

/// The Python with dkimpy: Debian's (/usr/bin/python3) before whatever `python3` is on PATH.
fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// dkimpy's verdict on `message` with `record` as the key record.
fn dkimpy(dir: &Path, message: &[u8], record: &str) -> bool {
    let m = dir.join("message.eml");
    let r = dir.join("record.txt");
    std::fs::write(&m, message).unwrap();
    std::fs::write(&r, record).unwrap();
    let out = Command::new(python())
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/dkim_verify.py"))
        .arg(&m)
        .arg(&r)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!(
            "dkimpy could not run (install python3-dkim; scripts/test does): {:?} {stderr}",
            out.status
        ),
    }
}

/// Key and record from the binary, a signature from the library, dkimpy's verdicts.
fn check(key_type: &str, selector: &str) {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join(format!("{key_type}.pem"));
    let key_s = key.to_str().unwrap();
    let (code, stdout, stderr) = generate(&[
        "--domain",
        "example.com",
        "--selector",
        selector,
        "--key-type",
        key_type,
        "--out",
        key_s,
    ]);
    assert_eq!(code, 0, "{stderr}");
    let line = stdout.trim_end();
    assert!(!line.contains('\n'), "one record line: {stdout}");
    assert!(
        line.starts_with(&format!("{selector}._domainkey.example.com. IN TXT \"")),
        "{line}"
    );
    let record = txt_value(line);
    assert!(
        record.starts_with(&format!("v=DKIM1; k={key_type}; s=tlsrpt; p=")),
        "{record}"
    );
    assert!(stderr.contains("[tls_rpt]"), "{stderr}");
    assert!(
        stderr.contains(&format!("dkim_selector = \"{selector}\"")),
        "{stderr}"
    );
    assert!(stderr.contains("dkim_domain = \"example.com\""), "{stderr}");
    assert!(stderr.contains("dkim_key = \""), "{stderr}");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    // Not overwritten without --force: the key on disk stays the one published.
    let before = std::fs::read(&key).unwrap();
    let (code, _, stderr) = generate(&[
        "--domain",
        "example.com",
        "--selector",
        selector,
        "--out",
        key_s,
    ]);
    assert_eq!(code, 1);
    assert!(stderr.contains("exists"), "{stderr}");
    assert_eq!(std::fs::read(&key).unwrap(), before);

    let signer = Signer::from_pem_file(&key, "example.com", selector).unwrap();
    let header = signer.sign(REPORT.as_bytes(), 1_743_552_600).unwrap();
    let signed = format!("{header}{REPORT}");
    assert!(
        dkimpy(dir.path(), signed.as_bytes(), &record),
        "dkimpy rejects:\n{signed}"
    );

    // One body byte changed.
    let tampered = signed.replace("H4sIAAAAAAAAA6tW", "H4sIAAAAAAAAA6tX");
    assert_ne!(tampered, signed);
    assert!(!dkimpy(dir.path(), tampered.as_bytes(), &record));
    // A second From added on the way (From is oversigned).
    let from = signed.replace("To: ", "From: other@example.net\r\nTo: ");
    assert!(!dkimpy(dir.path(), from.as_bytes(), &record));

    // Relaxed: refolded and respaced header fields (the signature's own too), trailing
    // whitespace on body lines, extra blank lines at the end.
    let loose = signed
        .replace("\r\n ", "\r\n\t  ")
        .replace("To: tlsrpt@example.org", "To:\ttlsrpt@example.org  ")
        .replace("report-type=tlsrpt;\r\n\t", "report-type=tlsrpt;  ")
        .replace("Subject: Report Domain:", "Subject:   Report\r\n Domain:")
        .replace("from example.com.\r\n", "from   example.com. \t\r\n")
        + "\r\n\r\n";
    assert!(
        dkimpy(dir.path(), loose.as_bytes(), &record),
        "dkimpy rejects:\n{loose}"
    );

    // --force replaces the key; the old record no longer verifies what the new key signs.
    let (code, stdout, stderr) = generate(&[
        "--domain",
        "example.com",
        "--selector",
        selector,
        "--key-type",
        key_type,
        "--out",
        key_s,
        "--force",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_ne!(std::fs::read(&key).unwrap(), before);
    let signer = Signer::from_pem_file(&key, "example.com", selector).unwrap();
    let signed = format!("{}{REPORT}", signer.sign(REPORT.as_bytes(), 0).unwrap());
    assert!(!dkimpy(dir.path(), signed.as_bytes(), &record));
    assert!(dkimpy(
        dir.path(),
        signed.as_bytes(),
        &txt_value(stdout.trim_end())
    ));
}

#[test]
fn rsa_verified_by_dkimpy() {
    check("rsa", "tlsrpt-rsa");
}

#[test]
fn ed25519_verified_by_dkimpy() {
    check("ed25519", "tlsrpt-ed");
}

#[test]
fn bad_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.pem");
    let (code, _, stderr) = generate(&[
        "--domain",
        "exa mple.com",
        "--selector",
        "s",
        "--out",
        key.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(stderr.contains("not a domain name"), "{stderr}");
    assert!(!key.exists());
    let err = Signer::from_pem_file(&key, "example.com", "s").unwrap_err();
    assert!(err.contains("k.pem"), "{err}");
}
