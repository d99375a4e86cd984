//! Operating Moat: after scripted traffic (local, discarded, verified-TLS, plaintext and
//! refused deliveries, a rejected command, STARTTLS sessions) the admin listener's
//! `/metrics` counters have moved as they should, the JSON API answers and acts on the queue,
//! every request without the token is refused, `moat status` summarises it, and the report
//! page renders its charts with data in headless Chromium.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::dns::{Rr, serve_zone};
use common::*;

const ADMIN_PORT: u16 = 2580;

fn metric(text: &str, series: &str) -> i64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

fn submit(c: &mut Client, to: &str, subject: &str) -> String {
    let r = c.send_mail(
        "alice@moat.test",
        &[to],
        &format!("Subject: {subject}\r\n\r\nbody\r\n"),
    );
    assert!(r.is("250 2.0.0"), "submit: {r}");
    r.text().rsplit(' ').next().unwrap().trim().to_string()
}

#[test]
fn metrics_api_status_and_report_after_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, leaves) = make_certs(dir.path(), &["mx.tls.ops.test"]);
    let dns = serve_zone(
        "127.0.13.53",
        "ops.test",
        &[
            Rr::Mx("tls.ops.test", 10, "mx.tls.ops.test"),
            Rr::A("mx.tls.ops.test", [127, 0, 13, 11]),
            Rr::Mx("plain.ops.test", 10, "mx.plain.ops.test"),
            Rr::A("mx.plain.ops.test", [127, 0, 13, 12]),
            Rr::Mx("down.ops.test", 10, "mx.down.ops.test"),
            Rr::A("mx.down.ops.test", [127, 0, 13, 13]),
        ],
    );
    let receiver = Moat::start_with(
        "127.0.13.11",
        &maildir_receiver("tls.ops.test", &leaves[0]),
        "",
    );
    plain_peer("127.0.13.12");
    let extra = format!(
        "[relay]\ntrusted_networks = [\"127.0.0.0/8\"]\n\n[outbound]\nport = 2525\nnameservers = [\"{dns}\"]\nconnect_timeout_secs = 2\ndns_timeout_secs = 1\n\n[queue]\nretry_schedule_secs = [3600]\n\n[[tls_policy]]\ndomains = [\"tls.ops.test\"]\nlevel = \"verify\"\nca_file = \"{}\"\n\n[admin]\nlisten = \"127.0.13.1:{ADMIN_PORT}\"\n",
        ca.display()
    );
    let sender = Moat::start_with("127.0.13.1", &extra, "");
    let admin: SocketAddr = format!("127.0.13.1:{ADMIN_PORT}").parse().unwrap();
    // The admin listener is the sender's own: it said so before its ready line.
    let stdout = sender.output().stdout_text();
    assert!(
        stdout.contains(&format!(
            "moat: admin API, metrics and report on http://{admin}/"
        )),
        "the sender did not report its admin listener on {admin}:\n{stdout}"
    );
    let token = std::fs::read_to_string(sender.data().join("admin.token"))
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(token.len(), 64);

    // Traffic: a plaintext session with a rejected command and four messages, then a
    // STARTTLS session with two more.
    let mut c = Client::connect(sender.addr(SMTP));
    c.ehlo();
    let rejected = c.cmd("MAIL FROM:<not an address>");
    assert_eq!(rejected.code / 100, 5, "{rejected}");
    let rejected_code = rejected.lines[0].split(' ').next().unwrap().to_string();
    let _ = c.cmd("RSET");
    submit(&mut c, "bob@moat.test", "local");
    submit(&mut c, "x@sink.test", "discarded");
    submit(&mut c, "v@tls.ops.test", "verified");
    submit(&mut c, "p@plain.ops.test", "plaintext");
    c.cmd("QUIT");
    let mut t = Client::connect(sender.addr(SMTP));
    t.ehlo();
    t.starttls("mx.moat.test");
    t.ehlo();
    let deferred_id = submit(&mut t, "d@down.ops.test", "deferred");
    submit(&mut t, "carol@moat.test", "local 2");
    t.cmd("QUIT");
    wait_for("the verified delivery", Duration::from_secs(20), || {
        receiver.mailbox("v").into_iter().next()
    });

    // Unauthenticated requests are refused everywhere.
    for path in [
        "/metrics",
        "/api/health",
        "/api/queue",
        "/report",
        "/api/reload",
    ] {
        assert_eq!(http(admin, "GET", path, None).0, 401, "{path}");
        assert_eq!(http(admin, "GET", path, Some("wrong")).0, 401, "{path}");
    }
    assert_eq!(http(admin, "GET", "/api/health?token=nope", None).0, 401);

    // Metrics after the traffic.
    let text = wait_for("all outcomes counted", Duration::from_secs(20), || {
        let (code, body) = http(admin, "GET", "/metrics", Some(&token));
        assert_eq!(code, 200);
        (metric(
            &body,
            "moat_messages_deferred_total{cause=\"4.4.316 connection refused\"}",
        ) >= 1
            && metric(
                &body,
                "moat_messages_delivered_total{tls_mode=\"plaintext\"}",
            ) >= 1
            // Local deliveries are counted when their queue state is saved: wait for them too.
            && metric(&body, "moat_messages_delivered_total{tls_mode=\"local\"}") >= 3)
            .then_some(body)
    });
    assert!(
        text.contains("# TYPE moat_connections_total counter"),
        "{text}"
    );
    assert!(
        metric(&text, "moat_connections_total{listener=\"smtp\"}") >= 2,
        "{text}"
    );
    assert_eq!(
        metric(&text, "moat_messages_accepted_total{listener=\"smtp\"}"),
        6,
        "{text}"
    );
    assert!(
        metric(
            &text,
            &format!("moat_messages_rejected_total{{code=\"{rejected_code}\"}}")
        ) >= 1,
        "{rejected_code}: {text}"
    );
    assert_eq!(
        metric(&text, "moat_messages_delivered_total{tls_mode=\"local\"}"),
        3,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "moat_messages_delivered_total{tls_mode=\"verified\"}"
        ),
        1,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "moat_messages_delivered_total{tls_mode=\"plaintext\"}"
        ),
        1,
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.starts_with(
            "moat_tls_handshakes_total{direction=\"in\",version=\"TLSv1.3\",cipher=\"TLS_"
        )),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l
                .starts_with("moat_tls_handshakes_total{direction=\"out\",version=\"TLSv1.3\"")),
        "{text}"
    );
    assert!(
        metric(&text, "moat_sessions_total{listener=\"smtp\",tls=\"yes\"}") >= 1,
        "{text}"
    );
    assert_eq!(
        metric(&text, "moat_queue_recipients{state=\"deferred\"}"),
        1,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "moat_node_info{node=\"mx.moat.test\",store=\"embedded\"}"
        ),
        1,
        "{text}"
    );
    assert!(
        metric(&text, "moat_spool_sync_seconds_count") >= 6,
        "{text}"
    );
    assert!(
        metric(&text, "moat_spool_sync_seconds_bucket{le=\"+Inf\"}")
            >= metric(&text, "moat_spool_sync_seconds_bucket{le=\"0.001\"}"),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l
            .starts_with("moat_certificate_expiry_seconds{serves=\"smtp\",name=\"mx.moat.test\"}")),
        "{text}"
    );

    // The JSON API.
    let (code, body) = http(admin, "GET", "/api/health", Some(&token));
    assert_eq!(code, 200, "{body}");
    let h: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(h["status"], "ok");
    assert_eq!(h["queue"]["deferred"], 1);
    assert_eq!(h["last_24h"]["delivered"], 5);
    let (code, body) = http(admin, "GET", "/api/queue?state=deferred", Some(&token));
    assert_eq!(code, 200);
    let q: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(q["count"], 1, "{body}");
    assert_eq!(q["messages"][0]["id"], deferred_id.as_str());
    assert_eq!(q["messages"][0]["recipients"][0]["status"], "4.4.316");
    // A domain given in another case, with the root dot, selects the same mail.
    let (code, body) = http(
        admin,
        "GET",
        "/api/queue?domain=DOWN.Ops.Test.",
        Some(&token),
    );
    assert_eq!(code, 200, "{body}");
    let q: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(q["count"], 1, "{body}");
    assert_eq!(q["messages"][0]["id"], deferred_id.as_str());
    let (code, body) = http(admin, "GET", "/api/queue?domain=ops.test", Some(&token));
    assert_eq!(code, 200, "{body}");
    let q: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(q["count"], 0, "{body}");
    let (code, body) = http(
        admin,
        "GET",
        &format!("/api/queue/{deferred_id}"),
        Some(&token),
    );
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("refused"), "{body}");
    assert_eq!(
        http(admin, "GET", "/api/queue/0000000000000000", Some(&token)).0,
        404
    );
    let (code, body) = http(
        admin,
        "POST",
        &format!("/api/queue/retry?id={deferred_id}"),
        Some(&token),
    );
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("retrying"), "{body}");
    assert_eq!(http(admin, "POST", "/api/queue/retry", Some(&token)).0, 400);
    assert_eq!(
        http(admin, "GET", "/api/queue/retry?all=1", Some(&token)).0,
        404
    );
    let (code, body) = http(admin, "GET", "/api/certificates", Some(&token));
    assert_eq!(code, 200);
    let certs: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(certs["certificates"][0]["serves"], "smtp");
    assert!(certs["certificates"][0]["days_left"].as_i64().unwrap() > 21);
    let (code, body) = http(admin, "GET", "/api/config", Some(&token));
    assert_eq!(code, 200);
    let cfg: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(cfg["tls_policies"][0]["level"], "verify");
    assert!(!body.contains("password"), "{body}");
    let (code, body) = http(admin, "GET", "/api/mta-sts", Some(&token));
    assert_eq!(code, 200);
    assert!(body.contains("\"enabled\": true"), "{body}");
    let (code, body) = http(admin, "POST", "/api/reload", Some(&token));
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("1 TLS policy rule(s)"), "{body}");
    assert_eq!(http(admin, "GET", "/api/reload", Some(&token)).0, 405);
    assert_eq!(http(admin, "GET", "/nowhere", Some(&token)).0, 404);

    // moat status.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_moat"))
        .args(["status", "--config"])
        .arg(&sender.config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("on mx.moat.test: ok"), "{text}");
    assert!(text.contains("queue: 1 message(s)"), "{text}");
    assert!(text.contains("last 24 h: 5 delivered"), "{text}");
    assert!(text.contains("plaintext 1"), "{text}");

    // The report page in headless Chromium, straight from the admin listener.
    common::chromium::require();
    let url = format!("http://{admin}/report?window=day&token={token}");
    let dom = common::chromium::dump_dom(&url);
    for id in [
        "chart-dest-tls",
        "chart-dest-auth",
        "chart-src-tls",
        "chart-causes",
    ] {
        let svg = common::chromium::element(&dom, "svg", id)
            .unwrap_or_else(|| panic!("no chart {id} in {dom}"));
        assert!(svg.contains("class=\"bar\""), "{id} has no bars: {svg}");
    }
    assert!(dom.contains("tls.ops.test"), "{dom}");
    assert!(dom.contains("4.4.316 connection refused"), "{dom}");
    assert!(dom.contains("mx.moat.test"), "certificate list: {dom}");
    let img = common::chromium::screenshot(&url);
    let whole = common::chromium::Rect {
        x: 0.0,
        y: 0.0,
        w: f64::from(img.width),
        h: f64::from(img.height),
    };
    for colour in [
        moat::report::TlsClass::Tls13.colour(),
        moat::report::TlsClass::Plaintext.colour(),
        moat::report::TlsClass::Local.colour(),
        moat::report::DEFERRED_COLOUR,
    ] {
        let n = img.count(whole, common::chromium::hex_rgb(colour), 8);
        assert!(n >= 100, "{colour}: only {n} pixels drawn");
    }

    // Non-loopback admin addresses are refused unless explicitly allowed.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&sender.config)
            .unwrap()
            .replace("listen = \"127.0.13.1:2580\"", "listen = \"0.0.0.0:2580\""),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_moat"))
        .args(["config", "check"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("admin") && err.contains("loopback"), "{err}");
}
