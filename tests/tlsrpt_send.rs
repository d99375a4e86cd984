//! TLS-RPT sending (RFC 8460) end to end on loopback: a sending Moat delivers to an MTA-STS
//! `enforce` domain whose MX presents a certificate for another name, to a DANE domain
//! (real signed zone, in-process validation) whose TLSA record matches nothing, and to a
//! domain without a policy that works. `moat tlsrpt results` shows what was recorded;
//! `moat tlsrpt send` (the admin "send now" for a day) reports to each failing domain's
//! `_smtp._tls` rua: by mail (DKIM-signed, through the queue) to a second Moat, which stores
//! it at its report address, and by HTTPS POST to that Moat's policy host. The mail's
//! signature is verified with dkimpy and its report checked against the RFC 8460 fields with
//! jsonschema (neither is Moat's code). No report about a day without failures, none about
//! the report's own delivery, none twice.

mod common;

use std::path::Path;
use std::time::Duration;

use common::https::PolicyServer;
use common::signed_dns::{Kind, Srr, serve_signed};
use common::*;

const POLICY_PORT: u16 = 8443;

fn receiver(ip: &str, domain: &str, identity: &(std::path::PathBuf, std::path::PathBuf)) -> Moat {
    let extra = maildir_receiver(domain, identity);
    Moat::start_with(ip, &extra, "")
}

fn cli_json(m: &Moat, args: &[&str]) -> serde_json::Value {
    let (ok, out) = moat_cli(m, args);
    assert!(ok, "moat {args:?}: {out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("moat {args:?}: {e}: {out}"))
}

fn policy<'a>(results: &'a serde_json::Value, kind: &str, domain: &str) -> &'a serde_json::Value {
    results["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["policy_type"] == kind && p["policy_domain"] == domain)
        .unwrap_or_else(|| panic!("no {kind} {domain} in {results:#}"))
}

#[test]
fn reports_go_by_signed_mail_and_https_to_failing_domains_only() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, leaves) = make_certs(
        dir.path(),
        &[
            "wrong.example",
            "mx.dane.rp.test",
            "mx.ok.rp.test",
            "mta-sts.sts.rp.test",
            "mta-sts.reports.rp.test",
        ],
    );
    let s = |x: &str| x.to_string();
    let dns = serve_signed(
        "127.0.26.53",
        dir.path(),
        "rp.test",
        &[],
        &[
            (
                "sts.rp.test",
                Kind::Insecure,
                vec![
                    Srr::Mx(s("sts.rp.test"), 10, s("mx.sts.rp.test")),
                    Srr::A(s("mx.sts.rp.test"), [127, 0, 26, 11]),
                    Srr::Txt(s("_mta-sts.sts.rp.test"), s("v=STSv1; id=20261204000000Z")),
                    Srr::A(s("mta-sts.sts.rp.test"), [127, 0, 26, 21]),
                    Srr::Txt(
                        s("_smtp._tls.sts.rp.test"),
                        s(
                            "v=TLSRPTv1; rua=mailto:tlsrpt@reports.rp.test,mailto:copy@reports.rp.test",
                        ),
                    ),
                ],
            ),
            (
                "dane.rp.test",
                Kind::Secure,
                vec![
                    Srr::Mx(s("dane.rp.test"), 10, s("mx.dane.rp.test")),
                    Srr::A(s("mx.dane.rp.test"), [127, 0, 26, 12]),
                    // Matches no certificate: every session fails DANE authentication.
                    Srr::Tlsa(s("_2525._tcp.mx.dane.rp.test"), 3, 1, 1, vec![0xab; 32]),
                    Srr::Txt(
                        s("_smtp._tls.mx.dane.rp.test"),
                        s("v=TLSRPTv1; rua=https://mta-sts.reports.rp.test/tlsrpt"),
                    ),
                ],
            ),
            (
                "ok.rp.test",
                Kind::Insecure,
                vec![
                    Srr::Mx(s("ok.rp.test"), 10, s("mx.ok.rp.test")),
                    Srr::A(s("mx.ok.rp.test"), [127, 0, 26, 13]),
                    Srr::Txt(
                        s("_smtp._tls.ok.rp.test"),
                        s("v=TLSRPTv1; rua=mailto:tlsrpt@reports.rp.test"),
                    ),
                ],
            ),
            (
                "reports.rp.test",
                Kind::Insecure,
                vec![
                    Srr::Mx(s("reports.rp.test"), 10, s("mx.reports.rp.test")),
                    Srr::A(s("mx.reports.rp.test"), [127, 0, 26, 2]),
                    Srr::A(s("mta-sts.reports.rp.test"), [127, 0, 26, 2]),
                    // A report mail's own delivery fails nothing, but must not be counted
                    // either way: this domain has a TLS-RPT record to tempt a report.
                    Srr::Txt(
                        s("_smtp._tls.reports.rp.test"),
                        s("v=TLSRPTv1; rua=mailto:copy@reports.rp.test"),
                    ),
                ],
            ),
        ],
    );
    let sts_policy = PolicyServer::start(&format!("127.0.26.21:{POLICY_PORT}"), &leaves[3]);
    sts_policy
        .set_policy("version: STSv1\r\nmode: enforce\r\nmx: mx.sts.rp.test\r\nmax_age: 86400\r\n");
    let _rx_sts = receiver("127.0.26.11", "sts.rp.test", &leaves[0]);
    let _rx_dane = receiver("127.0.26.12", "dane.rp.test", &leaves[1]);
    let rx_ok = receiver("127.0.26.13", "ok.rp.test", &leaves[2]);

    // The domain owner's Moat: its report address stores reports, its policy host takes
    // POSTed ones, and copy@ is a plain mailbox (the raw mail, for the independent checks).
    let owner_extra = format!(
        "[[domain]]\nname = \"reports.rp.test\"\nroute = \"maildir\"\n\n[tls_rpt]\nreport_addresses = [\"tlsrpt@reports.rp.test\"]\nhttps_endpoint = true\n\n[mta_sts]\nlisten = [\"127.0.26.2:{POLICY_PORT}\"]\n\n[[mta_sts.policy]]\ndomain = \"reports.rp.test\"\nmode = \"testing\"\nmax_age = 86400\ncert = \"{}\"\nkey = \"{}\"\n\n[admin]\nlisten = \"127.0.26.2:2580\"\n",
        leaves[4].0.display(),
        leaves[4].1.display()
    );
    let owner = Moat::start_with("127.0.26.2", &owner_extra, "");

    // The sender, with a DKIM key made by `moat dkim generate`.
    let key = dir.path().join("dkim.pem");
    let gen_out = std::process::Command::new(env!("CARGO_BIN_EXE_moat"))
        .args([
            "dkim",
            "generate",
            "--domain",
            "a.rp.test",
            "--selector",
            "rpt",
            "--out",
        ])
        .arg(&key)
        .output()
        .unwrap();
    assert!(gen_out.status.success(), "{gen_out:?}");
    let record = String::from_utf8(gen_out.stdout).unwrap();
    assert!(record.starts_with("rpt._domainkey.a.rp.test."), "{record}");
    let record_file = dir.path().join("dkim.txt");
    std::fs::write(&record_file, &record).unwrap();
    let sender_extra = format!(
        "[relay]\ntrusted_networks = [\"127.0.0.0/8\"]\n\n[outbound]\nport = {SMTP}\nnameservers = [\"{}\"]\nconnect_timeout_secs = 3\ndns_timeout_secs = 1\n\n[queue]\nretry_schedule_secs = [2]\n\n[mta_sts]\nfetch_port = {POLICY_PORT}\nfetch_timeout_secs = 5\nca_file = \"{}\"\n\n[dane]\ntrust_anchor_file = \"{}\"\ncheck_secure = \"rp.test\"\ncheck_bogus = \"\"\n\n[tls_rpt]\nsubmitter = \"a.rp.test\"\ncontact = \"mailto:postmaster@a.rp.test\"\nfrom = \"tlsrpt-noreply@a.rp.test\"\ndkim_key = \"{}\"\ndkim_selector = \"rpt\"\nsend_reports = true\n\n[admin]\nlisten = \"127.0.26.1:2580\"\n",
        dns.addr,
        ca.display(),
        dns.anchor_file.display(),
        key.display()
    );
    let tx = Moat::start_with("127.0.26.1", &sender_extra, "");
    wait_for("DANE self-check", Duration::from_secs(20), || {
        tx.log().contains("DANE available").then_some(())
    });

    for to in ["u@sts.rp.test", "u@dane.rp.test", "u@ok.rp.test"] {
        submit_plain(&tx, to);
    }
    wait_for("delivery to ok.rp.test", Duration::from_secs(30), || {
        rx_ok.mailbox("u").into_iter().next()
    });
    for (what, status) in [
        ("u@sts.rp.test", "status=4.7.5"),
        ("u@dane.rp.test", "status=4.7.323"),
    ] {
        wait_for(
            &format!("the deferral of {what}"),
            Duration::from_secs(30),
            || {
                tx.log()
                    .lines()
                    .find(|l| l.contains("not delivered") && l.contains(what) && l.contains(status))
                    .map(str::to_string)
            },
        );
    }

    // What was recorded: per policy type and domain, with the RFC 8460 result types.
    let results = cli_json(&tx, &["tlsrpt", "results", "--day", "today", "--json"]);
    let sts = policy(&results, "sts", "sts.rp.test");
    assert!(sts["failed"].as_u64().unwrap() >= 1, "{sts:#}");
    assert_eq!(sts["successful"], 0, "{sts:#}");
    assert_eq!(sts["mx_hosts"][0], "mx.sts.rp.test", "{sts:#}");
    assert!(
        sts["policy_strings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l == "mode: enforce"),
        "{sts:#}"
    );
    let d = &sts["failures"][0];
    assert_eq!(d["result_type"], "certificate-host-mismatch", "{sts:#}");
    assert_eq!(d["receiving_mx_hostname"], "mx.sts.rp.test", "{sts:#}");
    assert_eq!(d["receiving_ip"], "127.0.26.11", "{sts:#}");
    let tlsa = policy(&results, "tlsa", "mx.dane.rp.test");
    assert!(tlsa["failed"].as_u64().unwrap() >= 1, "{tlsa:#}");
    assert_eq!(
        tlsa["failures"][0]["result_type"], "tlsa-invalid",
        "{tlsa:#}"
    );
    assert_eq!(
        tlsa["policy_strings"][0],
        format!("3 1 1 {}", "ab".repeat(32)),
        "{tlsa:#}"
    );
    let ok = policy(&results, "no-policy-found", "ok.rp.test");
    assert_eq!(
        (ok["successful"].as_u64(), ok["failed"].as_u64()),
        (Some(1), Some(0)),
        "{ok:#}"
    );
    let (_, text) = moat_cli(&tx, &["tlsrpt", "results"]);
    assert!(text.contains("sts sts.rp.test: 0 successful"), "{text}");

    // Send now: the two failing domains get a report, the working one does not.
    let sent = cli_json(&tx, &["tlsrpt", "send", "--day", "today", "--json"]);
    let outcome = |domain: &str| {
        sent["reports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["domain"] == domain)
            .cloned()
            .unwrap_or_else(|| panic!("no outcome for {domain}: {sent:#}"))
    };
    assert_eq!(outcome("sts.rp.test")["result"], "sent", "{sent:#}");
    assert!(
        outcome("sts.rp.test")["rua"][0][1]
            .as_str()
            .unwrap()
            .starts_with("queued as"),
        "{sent:#}"
    );
    assert_eq!(outcome("mx.dane.rp.test")["result"], "sent", "{sent:#}");
    assert_eq!(
        outcome("mx.dane.rp.test")["rua"][0][1],
        "HTTP 201",
        "{sent:#}"
    );
    assert!(
        outcome("ok.rp.test")["result"]
            .as_str()
            .unwrap()
            .starts_with("no failure"),
        "{sent:#}"
    );

    // The raw report mail, checked by dkimpy and jsonschema.
    let mail = wait_for("the report mail at copy@", Duration::from_secs(30), || {
        mailbox_files(&owner.data().join("mail").join("copy"))
            .into_iter()
            .next()
    });
    let check = std::process::Command::new(python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/check_report_mail.py"))
        .arg(&mail)
        .arg(&record_file)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tlsrpt-report.schema.json"))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "the checker failed (python3-dkim and python3-jsonschema must be installed): {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let checked: serde_json::Value = serde_json::from_slice(&check.stdout).unwrap();
    assert_eq!(checked["dkim"], true, "DKIM did not verify: {checked:#}");
    assert_eq!(
        checked["schema_errors"],
        serde_json::json!([]),
        "{checked:#}"
    );
    assert!(
        checked["content_type"]
            .as_str()
            .unwrap()
            .contains("report-type=\"tlsrpt\""),
        "{checked:#}"
    );
    let file = checked["filename"].as_str().unwrap();
    assert!(file.starts_with("a.rp.test!sts.rp.test!"), "{file}");
    assert!(file.ends_with(".json.gz"), "{file}");
    let report = &checked["report"];
    assert_eq!(report["organization-name"], "a.rp.test");
    assert_eq!(report["contact-info"], "mailto:postmaster@a.rp.test");
    assert_eq!(
        report["policies"].as_array().unwrap().len(),
        1,
        "{report:#}"
    );
    assert_eq!(report["policies"][0]["policy"]["policy-type"], "sts");
    // A tampered copy does not verify: the check can fail.
    let tampered = dir.path().join("tampered.eml");
    let raw = std::fs::read_to_string(&mail).unwrap();
    std::fs::write(
        &tampered,
        raw.replacen("aggregate TLS report", "aggregate TLS rep0rt", 1),
    )
    .unwrap();
    let bad = std::process::Command::new(python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/check_report_mail.py"))
        .arg(&tampered)
        .arg(&record_file)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tlsrpt-report.schema.json"))
        .output()
        .unwrap();
    let bad: serde_json::Value = serde_json::from_slice(&bad.stdout).unwrap();
    assert_eq!(bad["dkim"], false, "{bad:#}");
    // Moat's own reader takes the mail as sent.
    let (ok, shown) = moat_cli(&owner, &["tlsrpt", "show", mail.to_str().unwrap()]);
    assert!(ok, "{shown}");
    assert!(shown.contains("from a.rp.test"), "{shown}");
    assert!(shown.contains("certificate-host-mismatch"), "{shown}");

    // The owner's Moat stored both: the mail at its report address and the POST.
    let stored = wait_for("both reports stored", Duration::from_secs(30), || {
        let (_, out) = moat_cli(&owner, &["tlsrpt", "show", "--days", "1", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        (v.as_array()?.len() >= 2).then_some(v)
    });
    let text = stored.to_string();
    assert!(text.contains("tlsa-invalid"), "{stored:#}");
    assert!(text.contains("mx.dane.rp.test"), "{stored:#}");
    assert!(text.contains("certificate-host-mismatch"), "{stored:#}");

    // No report twice; the report mail's own delivery was not counted.
    let again = cli_json(&tx, &["tlsrpt", "send", "--day", "today", "--json"]);
    for r in again["reports"].as_array().unwrap() {
        assert_ne!(r["result"], "sent", "{again:#}");
    }
    let after = cli_json(&tx, &["tlsrpt", "results", "--day", "today", "--json"]);
    assert!(
        !after
            .to_string()
            .contains("reports.rp.test\",\"policy_type"),
        "{after:#}"
    );
    assert!(
        after["policies"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["policy_domain"] != "reports.rp.test"),
        "the delivery of a report was counted: {after:#}"
    );
    assert_eq!(
        owner.mailbox("copy").len(),
        1,
        "a second report mail arrived"
    );

    // Results survive a restart (flushed at shutdown).
    let mut tx = tx;
    tx.terminate();
    tx.spawn();
    let back = cli_json(&tx, &["tlsrpt", "results", "--day", "today", "--json"]);
    assert!(
        policy(&back, "sts", "sts.rp.test")["failed"]
            .as_u64()
            .unwrap()
            >= 1
    );
    assert!(
        back["reported"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d == "sts.rp.test")
    );
}

/// Relays one message from a trusted address (no TLS needed).
fn submit_plain(m: &Moat, to: &str) {
    let mut c = Client::connect(m.addr(SMTP));
    c.ehlo();
    let r = c.cmd("MAIL FROM:<alice@moat.test>");
    assert!(r.is("250 2.1.0"), "{r}");
    let r = c.cmd(&format!("RCPT TO:<{to}>"));
    assert!(r.is("250 2.1.5"), "{r}");
    let r = c.cmd("DATA");
    assert_eq!(r.code, 354, "{r}");
    c.send(format!("Subject: to {to}\r\n\r\nhello\r\n.\r\n").as_bytes());
    let r = c.read_reply();
    assert!(r.is("250 2.0.0"), "{r}");
}

/// The message files in a maildir's `new/`.
fn mailbox_files(root: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(root.join("new"))
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// The Python with dkimpy and jsonschema: Debian's (/usr/bin/python3) before whatever
/// `python3` is on PATH.
fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}
