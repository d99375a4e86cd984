//! `moat tlsrpt show` on report files as they are saved from a mailbox: a multipart/report
//! mail with a base64 gzip part (made here with flate2 and base64, not by Moat), a bare
//! `.json.gz` attachment, and a file that holds no report.

use std::io::Write;
use std::process::Command;

use base64::Engine;

const REPORT: &str = r#"{"organization-name": "Reporter Org", "report-id": "rep-42",
  "contact-info": "tls-reports@reporter.example",
  "date-range": {"start-datetime": "2026-12-02T00:00:00Z", "end-datetime": "2026-12-02T23:59:59Z"},
  "policies": [{"policy": {"policy-type": "tlsa", "policy-domain": "mx.moat.test",
     "policy-string": ["3 1 1 0011"]},
    "summary": {"total-successful-session-count": 40, "total-failure-session-count": 2},
    "failure-details": [{"result-type": "tlsa-invalid", "receiving-mx-hostname": "mx.moat.test",
      "receiving-ip": "192.0.2.25", "failed-session-count": 2}]}]}"#;

fn moat(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_moat"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn tlsrpt_show_reads_report_mails_and_attachments() {
    let dir = tempfile::tempdir().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(REPORT.as_bytes()).unwrap();
    let gz = gz.finish().unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&gz);
    let mail = format!(
        "From: tls-reports@reporter.example\r\nTo: tlsrpt@moat.test\r\nSubject: Report Domain: mx.moat.test\r\n\
         TLS-Report-Domain: mx.moat.test\r\nTLS-Report-Submitter: Reporter Org\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=\"tlsrpt\"; boundary=\"b\"\r\n\r\n\
         --b\r\nContent-Type: text/plain\r\n\r\nA TLS report.\r\n--b\r\n\
         Content-Type: application/tlsrpt+gzip; name=\"Reporter Org!mx.moat.test!1796169600!1796255999!rep-42.json.gz\"\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n{}\r\n--b--\r\n",
        b64.as_bytes()
            .chunks(76)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join("\r\n")
    );
    let eml = dir.path().join("report.eml");
    std::fs::write(&eml, mail).unwrap();
    let attachment = dir.path().join("rep-42.json.gz");
    std::fs::write(&attachment, &gz).unwrap();

    for f in [&eml, &attachment] {
        let (rc, out) = moat(&["tlsrpt", "show", f.to_str().unwrap()]);
        assert_eq!(rc, 0, "{out}");
        assert!(
            out.contains("report rep-42 from Reporter Org (tls-reports@reporter.example), 2026-12-02 00:00 UTC to 2026-12-02 23:59 UTC: 40 successful, 2 failed session(s)"),
            "{out}"
        );
        assert!(
            out.contains("  tlsa mx.moat.test: 40 successful, 2 failed"),
            "{out}"
        );
        assert!(
            out.contains("    tlsa-invalid x2 mx=mx.moat.test ip=192.0.2.25"),
            "{out}"
        );
    }
    let (rc, out) = moat(&["tlsrpt", "show", "--json", eml.to_str().unwrap()]);
    assert_eq!(rc, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["report_domain"], "mx.moat.test");
    assert_eq!(v[0]["reports"][0]["policies"][0]["failures"][0]["count"], 2);

    // No report: said, and exit status 1.
    let note = dir.path().join("note.eml");
    std::fs::write(&note, "Subject: hi\r\n\r\nno report here\r\n").unwrap();
    let (rc, out) = moat(&["tlsrpt", "show", note.to_str().unwrap()]);
    assert_eq!(rc, 1, "{out}");
    assert!(
        out.contains("problem: no report part found in the message"),
        "{out}"
    );
}
