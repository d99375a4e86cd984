//! Receiving TLS-RPT reports: `moat tlsrpt show` on report files as they are saved from a
//! mailbox (a multipart/report mail with a base64 gzip part made here with flate2 and base64,
//! not by Moat; a bare `.json.gz` attachment; a file with no report), and report mail sent
//! over SMTP to a `[tls_rpt] report_addresses` address, stored and shown by `--days`.

mod common;

use std::io::Write;
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use common::{Client, Moat, SMTP, http, moat_cli, wait_for};

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

fn gzipped(data: &str) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(data.as_bytes()).unwrap();
    gz.finish().unwrap()
}

/// A report mail in the RFC 8460 §5.3 form, its gzip part in base64.
fn report_mail(gz: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(gz);
    format!(
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
    )
}

#[test]
fn tlsrpt_show_reads_report_mails_and_attachments() {
    let dir = tempfile::tempdir().unwrap();
    let gz = gzipped(REPORT);
    let eml = dir.path().join("report.eml");
    std::fs::write(&eml, report_mail(&gz)).unwrap();
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

/// Mail to a report address is accepted although its domain is served by no rule, stored as
/// a report (and not delivered anywhere else), and `moat tlsrpt show --days 1` prints it; a
/// mail there with no report in it is accepted too and kept for inspection.
#[test]
fn report_mail_over_smtp_is_stored_and_shown() {
    let m = Moat::start_with(
        "127.0.21.71",
        "[tls_rpt]\nreport_addresses = [\"TLSRPT@reports.moat.test\"]\n\n[admin]\nlisten = \"127.0.21.71:2580\"\n",
        "",
    );
    let mut c = Client::connect(m.addr(SMTP));
    c.ehlo();
    // Another address at the same domain is not accepted: only the report address is.
    let r = c.cmd("MAIL FROM:<tls-reports@reporter.example>");
    assert!(r.is("250"), "{r}");
    let r = c.cmd("RCPT TO:<someone@reports.moat.test>");
    assert!(r.is("554 5.7.1"), "{r}");
    c.cmd("RSET");
    let mail = report_mail(&gzipped(REPORT));
    let r = c.send_mail(
        "tls-reports@reporter.example",
        &["tlsrpt@Reports.Moat.Test"],
        &mail,
    );
    assert!(r.is("250 2.0.0"), "{r}");
    let r = c.send_mail(
        "someone@reporter.example",
        &["tlsrpt@reports.moat.test"],
        "Subject: hello\r\n\r\nnot a report\r\n",
    );
    assert!(r.is("250 2.0.0"), "{r}");
    let log = wait_for("both report mails stored", Duration::from_secs(20), || {
        let log = m.log();
        (log.matches("TLS-RPT report stored").count() >= 2).then_some(log)
    });
    assert!(
        log.lines().any(|l| l.contains("TLS-RPT report stored")
            && l.contains("reports=1")
            && l.contains("successful=40")
            && l.contains("failed=2")),
        "{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("delivered") && l.contains("relay=tlsrpt")),
        "{log}"
    );
    let (ok, out) = moat_cli(&m, &["tlsrpt", "show", "--days", "1"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("from tls-reports@reporter.example about mx.moat.test:"),
        "{out}"
    );
    assert!(out.contains("report rep-42 from Reporter Org"), "{out}");
    assert!(out.contains("    tlsa-invalid x2 mx=mx.moat.test"), "{out}");
    assert!(
        out.contains("problem: no report part found in the message"),
        "{out}"
    );
    let (ok, out) = moat_cli(&m, &["tlsrpt", "show", "--days", "1", "--json"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2, "{out}");
    assert_eq!(v[0]["reports"][0]["report_id"], "rep-42");
    // The admin API: per reporter and day, failures by type and by our MX host.
    let token = std::fs::read_to_string(m.data().join("admin.token")).unwrap();
    let admin: std::net::SocketAddr = "127.0.21.71:2580".parse().unwrap();
    let (status, body) = http(admin, "GET", "/api/tlsrpt?days=3", Some(token.trim()));
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["days"], 3);
    let day = &v["summary"][0];
    assert_eq!(day["organization"], "Reporter Org", "{body}");
    assert_eq!(day["day"], "2026-12-02");
    assert_eq!(
        (day["successful"].as_u64(), day["failed"].as_u64()),
        (Some(40), Some(2))
    );
    assert_eq!(day["by_result"]["tlsa-invalid"], 2);
    assert_eq!(day["by_mx"]["mx.moat.test"], 2);
    assert_eq!(v["mails"].as_array().unwrap().len(), 2);
    let (status, _) = http(admin, "GET", "/api/tlsrpt?days=0", Some(token.trim()));
    assert_eq!(status, 400);
    let (status, _) = http(admin, "GET", "/api/tlsrpt", None);
    assert_eq!(status, 401);
    // The report page's "how others see us".
    let (status, page) = http(admin, "GET", "/report?window=week", Some(token.trim()));
    assert_eq!(status, 200);
    assert!(page.contains("id=\"chart-others\""), "{page}");
    assert!(page.contains("2026-12-02 Reporter Org"), "{page}");
    assert!(page.contains("<td>mx.moat.test</td><td>2</td>"), "{page}");
    // Nothing went into a mailbox.
    assert!(m.mailbox("tlsrpt").is_empty());
}
