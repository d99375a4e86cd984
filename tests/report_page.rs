//! The transport-security report page in a real browser: headless Chromium (Debian's package)
//! loads the rendered page, the DOM it builds is checked for the charts' bars and the
//! certificate tables, and a screenshot is checked for the charts' colours inside each chart's
//! box, so the charts are known to draw, not just to be in the markup.
//!
//! Set `MOAT_REPORT_SCREENSHOT=/path/shot.png` to keep the screenshot of the page with data.

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::Path;

use common::chromium::{self, Image, Rect, hex_rgb};
use moat::report::{
    AuthClass, BOUNCED_COLOUR, CertStatus, DEFERRED_COLOUR, DeliveryEvent, Outcome, TlsClass,
    Window, render_page, summarize,
};

const NOW: u64 = 1_795_468_016; // 2026-11-23 21:06:56 UTC
const CHARTS: [&str; 4] = [
    "chart-dest-tls",
    "chart-dest-auth",
    "chart-src-tls",
    "chart-causes",
];
const HOSTILE: &str = "<b>evil\"</b>.test";

fn event(
    i: u64,
    from: &str,
    to: &str,
    outcome: Outcome,
    tls: TlsClass,
    auth: AuthClass,
    cause: Option<&str>,
) -> DeliveryEvent {
    DeliveryEvent {
        time: NOW - 60 - i * 7,
        queue_id: format!("{:016X}", 0xA000 + i),
        sender_domain: from.to_string(),
        rcpt_domain: to.to_string(),
        outcome,
        tls,
        auth,
        cause: cause.map(str::to_string),
    }
}

/// Count, sender domain, recipient domain, outcome, transport, authentication, cause.
type Plan = (
    usize,
    &'static str,
    &'static str,
    Outcome,
    TlsClass,
    AuthClass,
    Option<&'static str>,
);

/// Several destinations and senders, every TLS class, deferrals and bounces with causes.
fn events() -> Vec<DeliveryEvent> {
    use AuthClass as A;
    use Outcome::*;
    use TlsClass as T;
    let plan: &[Plan] = &[
        (
            60,
            "example.test",
            "gmail.test",
            Delivered,
            T::Tls13,
            A::Verified,
            None,
        ),
        (
            10,
            "lists.example.test",
            "gmail.test",
            Delivered,
            T::Tls13,
            A::MtaSts,
            None,
        ),
        (
            30,
            "example.test",
            "outlook.test",
            Delivered,
            T::Tls12,
            A::MtaSts,
            None,
        ),
        (
            20,
            "lists.example.test",
            "outlook.test",
            Delivered,
            T::Tls13,
            A::Opportunistic,
            None,
        ),
        (
            25,
            "example.test",
            "legacy.test",
            Delivered,
            T::Plaintext,
            A::Plaintext,
            None,
        ),
        (
            5,
            "",
            "legacy.test",
            Delivered,
            T::Tls12,
            A::Opportunistic,
            None,
        ),
        (
            20,
            "lists.example.test",
            "moat.test",
            Delivered,
            T::Local,
            A::Local,
            None,
        ),
        (
            1,
            "example.test",
            HOSTILE,
            Delivered,
            T::Tls13,
            A::Verified,
            None,
        ),
        (
            8,
            "example.test",
            "broken.test",
            Deferred,
            T::None,
            A::None,
            Some("4.4.316 connection refused"),
        ),
        (
            3,
            "example.test",
            "broken.test",
            Bounced,
            T::Tls13,
            A::None,
            Some("5.7.320 certificate validation failed: expired"),
        ),
        (
            12,
            "lists.example.test",
            "slow.test",
            Deferred,
            T::None,
            A::None,
            Some("4.4.315 connection timed out"),
        ),
        (
            2,
            "example.test",
            "slow.test",
            Deferred,
            T::Tls12,
            A::None,
            Some("4.7.5 certificate failed MTA-STS validation"),
        ),
    ];
    let mut out = Vec::new();
    for &(n, from, to, outcome, tls, auth, cause) in plan {
        for _ in 0..n {
            out.push(event(out.len() as u64, from, to, outcome, tls, auth, cause));
        }
    }
    // Outside the week: must not show.
    let mut old = event(
        0,
        "old.test",
        "ancient.test",
        Delivered,
        T::Tls13,
        A::Dane,
        None,
    );
    old.time = NOW - 9 * 86_400;
    out.push(old);
    out
}

/// (row, category) pairs with at least one delivered message, per chart, computed straight
/// from the events (independently of `summarize`).
fn expected_bars(events: &[DeliveryEvent]) -> [usize; 4] {
    let from = NOW - Window::Week.secs();
    let recent: Vec<&DeliveryEvent> = events.iter().filter(|e| e.time >= from).collect();
    let delivered = || recent.iter().filter(|e| e.outcome == Outcome::Delivered);
    let shown_tls = |t: TlsClass| t != TlsClass::None;
    let shown_auth = |a: AuthClass| a != AuthClass::None;
    let dest_tls: HashSet<_> = delivered()
        .filter(|e| shown_tls(e.tls))
        .map(|e| (e.rcpt_domain.clone(), e.tls))
        .collect();
    let dest_auth: HashSet<_> = delivered()
        .filter(|e| shown_auth(e.auth))
        .map(|e| (e.rcpt_domain.clone(), e.auth))
        .collect();
    let src_tls: HashSet<_> = delivered()
        .filter(|e| shown_tls(e.tls))
        .map(|e| (e.sender_domain.clone(), e.tls))
        .collect();
    let causes: HashSet<_> = recent
        .iter()
        .filter(|e| e.outcome != Outcome::Delivered)
        .map(|e| (e.cause.clone(), e.outcome))
        .collect();
    [dest_tls.len(), dest_auth.len(), src_tls.len(), causes.len()]
}

fn certs() -> Vec<CertStatus> {
    vec![
        CertStatus::new(
            vec!["mx.moat.test".into(), "moat.test".into()],
            NOW + 5 * 86_400 + 3600,
            "/etc/moat/certs/mx.pem",
            NOW,
        ),
        CertStatus::new(
            vec!["old.moat.test".into()],
            NOW - 2 * 86_400,
            "/etc/moat/certs/old.pem",
            NOW,
        ),
        CertStatus::new(
            vec!["mta-sts.moat.test".into()],
            NOW + 200 * 86_400,
            "mta-sts host",
            NOW,
        ),
    ]
}

/// Writes `html` (with the layout-box script) to `dir/name` and returns its URL.
fn write_page(dir: &Path, name: &str, html: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, chromium::with_box_script(html, "svg.chart")).unwrap();
    chromium::file_url(&path)
}

fn bars_in(dom: &str, id: &str) -> usize {
    let svg = chromium::element(dom, "svg", id).unwrap_or_else(|| panic!("{id} missing"));
    svg.matches("<rect class=\"bar\"").count()
}

fn chart_box(dom: &str, id: &str) -> Rect {
    let b = chromium::boxes(dom);
    let r = *b
        .get(id)
        .unwrap_or_else(|| panic!("no layout box for {id}"));
    assert!(r.w > 100.0 && r.h > 10.0, "{id} laid out as {r:?}");
    r
}

/// Palette colours that are not grey (grey also appears in anti-aliased text).
fn colours() -> Vec<(&'static str, [u8; 3])> {
    let mut v: Vec<(&'static str, [u8; 3])> = TlsClass::ALL
        .iter()
        .map(|c| (c.label(), hex_rgb(c.colour())))
        .chain(
            AuthClass::ALL
                .iter()
                .map(|c| (c.label(), hex_rgb(c.colour()))),
        )
        .chain([
            ("deferred", hex_rgb(DEFERRED_COLOUR)),
            ("bounced", hex_rgb(BOUNCED_COLOUR)),
        ])
        .filter(|(_, c)| !(c[0] == c[1] && c[1] == c[2]))
        .collect();
    v.sort();
    v.dedup();
    v
}

fn count(img: &Image, r: Rect, colour: &str) -> usize {
    img.count(r, hex_rgb(colour), 2)
}

#[test]
fn charts_render_with_data() {
    chromium::require();
    let dir = tempfile::tempdir().unwrap();
    let events = events();
    let summary = summarize(&events, NOW, Window::Week);
    let html = render_page(&summary, &certs(), NOW, Window::Week, "token=s3cret");
    let url = write_page(dir.path(), "report.html", &html);

    // 1. The DOM Chromium built.
    let dom = chromium::dump_dom(&url);
    let expected = expected_bars(&events);
    for (id, want) in CHARTS.iter().zip(expected) {
        assert!(want > 0);
        assert_eq!(bars_in(&dom, id), want, "bars in {id}");
        let svg = chromium::element(&dom, "svg", id).unwrap();
        assert!(svg.contains("class=\"chart\"") && svg.contains("role=\"img\""));
        assert!(svg.contains("aria-label=\""), "{id}");
        assert!(!svg.contains("no data in this window"), "{id}");
    }
    assert_eq!(expected, [7, 8, 6, 4]);
    let dest_tls = chromium::element(&dom, "svg", "chart-dest-tls").unwrap();
    assert!(dest_tls.contains("<title>gmail.test — TLS 1.3: 70</title>"));
    assert!(dest_tls.contains("<title>legacy.test — plaintext: 25</title>"));
    assert!(dest_tls.contains("moat.test — local: 20"));
    assert!(dest_tls.contains("8 deferred · 3 bounced"));
    assert!(
        !dom.contains("ancient.test"),
        "event older than the window shown"
    );
    // The hostile domain is text, not markup.
    assert!(dest_tls.contains("&lt;b&gt;evil\"&lt;/b&gt;.test"));
    assert!(!dom.contains("<b>evil"));
    let src = chromium::element(&dom, "svg", "chart-src-tls").unwrap();
    assert!(src.contains("(null sender) — TLS 1.2: 5"));
    let causes = chromium::element(&dom, "svg", "chart-causes").unwrap();
    assert!(causes.contains("4.4.316 connection refused — deferred: 8"));
    assert!(causes.contains("5.7.320 certificate validation failed: expired — bounced: 3"));
    // Links keep the token.
    assert!(dom.contains("href=\"?window=day&amp;token=s3cret\""));
    // Certificates: the near-expiry table holds the 5-day one (highlighted) and the expired
    // one (in red); the full list holds all three.
    let near = chromium::element(&dom, "section", "certs-near").unwrap();
    assert!(near.contains("mx.moat.test, moat.test"));
    assert!(near.contains("old.moat.test"));
    assert!(!near.contains("mta-sts.moat.test"));
    assert!(near.contains("<tr class=\"soon\"><td class=\"num\">5</td>"));
    assert!(near.contains("<tr class=\"expired\"><td class=\"num\">expired 2 d ago</td>"));
    let all = chromium::element(&dom, "section", "certs-all").unwrap();
    for name in ["mx.moat.test", "old.moat.test", "mta-sts.moat.test"] {
        assert!(all.contains(name), "{name}");
    }
    assert!(dom.contains("<div class=\"n\" id=\"total-deferred\">22</div>"));

    // 2. What Chromium drew: each chart's colours inside its own box.
    let keep = std::env::var_os("MOAT_REPORT_SCREENSHOT");
    let shot = keep
        .as_ref()
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| dir.path().join("report.png"));
    let img = chromium::screenshot_to(&url, &shot);
    assert_eq!((img.width, img.height), chromium::WINDOW);
    let boxes: Vec<Rect> = CHARTS.iter().map(|id| chart_box(&dom, id)).collect();
    for r in &boxes {
        assert!(
            r.y + r.h <= f64::from(img.height),
            "chart below the screenshot: {r:?}"
        );
    }
    let drawn = |chart: usize, colours: &[&str]| {
        for c in colours {
            let n = count(&img, boxes[chart], c);
            assert!(
                n >= 100,
                "{}: only {n} pixels of {c} (screenshot {})",
                CHARTS[chart],
                shot.display()
            );
        }
    };
    let absent = |chart: usize, colours: &[&str]| {
        for c in colours {
            let n = count(&img, boxes[chart], c);
            assert_eq!(n, 0, "{}: {n} pixels of {c}", CHARTS[chart]);
        }
    };
    let tls = [
        TlsClass::Tls13,
        TlsClass::Tls12,
        TlsClass::Plaintext,
        TlsClass::Local,
    ]
    .map(|c| c.colour());
    drawn(0, &tls);
    drawn(2, &tls);
    absent(
        0,
        &[AuthClass::Dane.colour(), DEFERRED_COLOUR, BOUNCED_COLOUR],
    );
    drawn(
        1,
        &[
            AuthClass::Verified,
            AuthClass::MtaSts,
            AuthClass::Opportunistic,
            AuthClass::Plaintext,
            AuthClass::Local,
        ]
        .map(|c| c.colour()),
    );
    // No DANE deliveries in this window.
    absent(1, &[AuthClass::Dane.colour()]);
    drawn(3, &[DEFERRED_COLOUR, BOUNCED_COLOUR]);
    absent(3, &[TlsClass::Tls13.colour(), TlsClass::Tls12.colour()]);
    // Highlighted certificate rows are painted too (amber and red backgrounds).
    let whole = Rect {
        x: 0.0,
        y: 0.0,
        w: f64::from(img.width),
        h: f64::from(img.height),
    };
    assert!(
        img.count(whole, hex_rgb("#fff0c2"), 2) > 200,
        "no amber row"
    );
    assert!(img.count(whole, hex_rgb("#ffd6d6"), 2) > 200, "no red row");
}

#[test]
fn charts_without_data_say_so() {
    chromium::require();
    let dir = tempfile::tempdir().unwrap();
    let summary = summarize(&[], NOW, Window::Day);
    let html = render_page(&summary, &[], NOW, Window::Day, "");
    let url = write_page(dir.path(), "empty.html", &html);
    let dom = chromium::dump_dom(&url);
    for id in CHARTS {
        let svg = chromium::element(&dom, "svg", id).unwrap_or_else(|| panic!("{id} missing"));
        assert!(svg.contains("no data in this window"), "{id}: {svg}");
        assert_eq!(bars_in(&dom, id), 0, "{id}");
    }
    assert!(!dom.contains("class=\"bar\""));
    assert!(dom.contains("No certificates known."));
    assert!(dom.contains("<div class=\"n\" id=\"total-delivered\">0</div>"));

    // The screenshot shows the message and none of the data colours in the chart areas.
    let img = chromium::screenshot(&url);
    for id in CHARTS {
        let r = chart_box(&dom, id);
        for (name, rgb) in colours() {
            assert_eq!(img.count(r, rgb, 2), 0, "{id}: {name} drawn without data");
        }
        let ink = (r.y as u32..(r.y + r.h) as u32)
            .flat_map(|y| (r.x as u32..(r.x + r.w) as u32).map(move |x| (x, y)))
            .filter(|&(x, y)| img.pixel(x, y)[0] < 200)
            .count();
        assert!(
            ink > 50,
            "{id}: the 'no data' text was not drawn ({ink} dark pixels)"
        );
    }
}

/// The harness also loads pages over HTTP (as the admin listener serves them).
#[test]
fn page_over_http() {
    chromium::require();
    let summary = summarize(&events(), NOW, Window::Day);
    let html = render_page(&summary, &certs(), NOW, Window::Day, "");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { return };
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).unwrap_or(0);
            let head = String::from_utf8_lossy(&buf[..n]);
            let reply = if head.starts_with("GET /report") {
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{html}",
                    html.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into()
            };
            let _ = s.write_all(reply.as_bytes());
        }
    });
    let dom = chromium::dump_dom(&format!("http://{addr}/report?window=day"));
    assert!(bars_in(&dom, "chart-dest-tls") > 0, "{dom}");
    assert!(dom.contains("Last 24 h"));
}

/// The DEFLATE decoder used for screenshots agrees with zlib (via python3) on stored, fixed
/// and dynamic Huffman blocks.
#[test]
fn inflate_matches_zlib() {
    let dir = tempfile::tempdir().unwrap();
    let script = r#"
import sys, zlib, os
data = b"".join((b"moat %d transport security " % i) * (i % 7 + 1) for i in range(3000))
data += bytes((i * 7919) % 251 for i in range(70000))
open(os.path.join(sys.argv[1], "plain"), "wb").write(data)
for name, level, strategy in [("stored", 0, zlib.Z_DEFAULT_STRATEGY),
                              ("fixed", 6, zlib.Z_FIXED),
                              ("dynamic", 9, zlib.Z_DEFAULT_STRATEGY),
                              ("rle", 6, zlib.Z_RLE)]:
    c = zlib.compressobj(level, zlib.DEFLATED, 15, 9, strategy)
    open(os.path.join(sys.argv[1], name), "wb").write(c.compress(data) + c.flush())
"#;
    let status = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(dir.path())
        .status()
        .expect("python3 is needed for this test");
    assert!(status.success());
    let plain = std::fs::read(dir.path().join("plain")).unwrap();
    for name in ["stored", "fixed", "dynamic", "rle"] {
        let z = std::fs::read(dir.path().join(name)).unwrap();
        let out = chromium::zlib_decompress(&z).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(out == plain, "{name}: decoded data differs");
        let mut bad = z.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(
            chromium::zlib_decompress(&bad).is_err(),
            "{name}: checksum not checked"
        );
    }
}
