//! Finding the report in a mail message (RFC 8460 §5.3): a `multipart/report;
//! report-type="tlsrpt"` whose report part is `application/tlsrpt+gzip` or
//! `application/tlsrpt+json`, in base64 or not; also what reporters actually send: the
//! report as the whole body, under `application/gzip`, `application/json` or
//! `application/octet-stream` with a `.json` / `.gz` file name, nested in other multiparts.
//! Bounded: [`MAX_MESSAGE`] read, [`MAX_REPORT`] after decompression, [`MAX_PARTS`] parts.

use std::io::Read;

use base64::Engine as _;

use super::report::{self, Report};

/// Bytes of a message looked at.
pub const MAX_MESSAGE: usize = 10 * 1024 * 1024;
/// Bytes of one report after decompression (a gzip bomb stops here).
pub const MAX_REPORT: usize = 50 * 1024 * 1024;
/// MIME parts looked at, nesting included.
pub const MAX_PARTS: usize = 200;
const MAX_DEPTH: usize = 8;

/// What one message held: the reports read and, in words, what could not be read.
#[derive(Debug, Default)]
pub struct Found {
    pub reports: Vec<Report>,
    pub problems: Vec<String>,
    /// The `TLS-Report-Domain` and `TLS-Report-Submitter` headers, when present.
    pub report_domain: Option<String>,
    pub submitter: Option<String>,
}

/// Reads every report in `message` (headers and body, CRLF or LF line ends).
pub fn reports_in_message(message: &[u8]) -> Found {
    let message = &message[..message.len().min(MAX_MESSAGE)];
    let mut found = Found::default();
    let (headers, _) = split_head(message);
    found.report_domain = header(&headers, "tls-report-domain");
    found.submitter = header(&headers, "tls-report-submitter");
    let mut payloads = Vec::new();
    let mut parts = 0;
    walk(message, 0, &mut parts, &mut payloads);
    if payloads.is_empty() {
        found
            .problems
            .push("no report part found in the message".into());
    }
    for (what, bytes) in payloads {
        match decode_payload(&bytes).and_then(|json| report::parse(&json)) {
            Ok(r) => found.reports.push(r),
            Err(e) => found.problems.push(format!("{what}: {e}")),
        }
    }
    found
}

/// A report file or body: gzip (by its magic number) or JSON.
pub fn decode_payload(bytes: &[u8]) -> Result<Vec<u8>, String> {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        let mut d = flate2::read::MultiGzDecoder::new(bytes).take(MAX_REPORT as u64 + 1);
        if let Err(e) = d.read_to_end(&mut out) {
            // A truncated stream: keep what came out when it is a whole document.
            if out.is_empty() {
                return Err(format!("not valid gzip: {e}"));
            }
        }
        if out.len() > MAX_REPORT {
            return Err(format!(
                "the report is larger than {} MiB uncompressed",
                MAX_REPORT >> 20
            ));
        }
        return Ok(out);
    }
    Ok(bytes.to_vec())
}

/// One entity: the header fields (unfolded, names lowercased) and the body.
type Headers = Vec<(String, String)>;

fn walk(entity: &[u8], depth: usize, parts: &mut usize, out: &mut Vec<(String, Vec<u8>)>) {
    *parts += 1;
    if *parts > MAX_PARTS || depth > MAX_DEPTH {
        return;
    }
    let (headers, body) = split_head(entity);
    let ctype = header(&headers, "content-type").unwrap_or_default();
    let (mime, params) = content_type(&ctype);
    if mime.starts_with("multipart/") {
        if let Some(boundary) = param(&params, "boundary") {
            for part in split_multipart(body, &boundary) {
                walk(part, depth + 1, parts, out);
            }
        }
        return;
    }
    let name = param(&params, "name")
        .or_else(|| {
            header(&headers, "content-disposition")
                .and_then(|d| param(&content_type(&format!("x/x; {d}")).1, "filename"))
        })
        .unwrap_or_default()
        .to_ascii_lowercase();
    let report_name =
        name.ends_with(".json") || name.ends_with(".gz") || name.ends_with(".json.gz");
    let is_report = match mime.as_str() {
        "application/tlsrpt+gzip"
        | "application/tlsrpt+json"
        | "application/gzip"
        | "application/x-gzip"
        | "application/json" => true,
        "application/octet-stream" => report_name,
        // A bare body (no MIME) or a text part that holds JSON: looked at, kept if it parses.
        "" | "text/plain" => true,
        _ => report_name,
    };
    if !is_report {
        return;
    }
    let cte = header(&headers, "content-transfer-encoding")
        .unwrap_or_default()
        .to_ascii_lowercase();
    let data = match cte.trim() {
        "base64" => decode_base64(body),
        "quoted-printable" => decode_qp(body),
        _ => body.to_vec(),
    };
    let looks_like_report = data.starts_with(&[0x1f, 0x8b])
        || data
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|b| *b == b'{' || *b == b'"' || *b == b'[');
    if mime.starts_with("application/") || looks_like_report {
        let what = if name.is_empty() {
            if mime.is_empty() {
                "the message body".to_string()
            } else {
                format!("the {mime} part")
            }
        } else {
            format!("{name} ({mime})")
        };
        if mime.is_empty() || mime == "text/plain" {
            if looks_like_report {
                out.push((what, data));
            }
        } else {
            out.push((what, data));
        }
    }
}

/// Splits at the first empty line; without one, all is header (no body).
fn split_head(entity: &[u8]) -> (Headers, &[u8]) {
    let mut end = None;
    let mut i = 0;
    while i < entity.len() {
        if entity[i..].starts_with(b"\r\n\r\n") {
            end = Some((i, i + 4));
            break;
        }
        if entity[i..].starts_with(b"\n\n") {
            end = Some((i, i + 2));
            break;
        }
        i += 1;
    }
    // An entity that starts with its body (no header lines at all).
    if entity.starts_with(b"\r\n") {
        return (Vec::new(), &entity[2..]);
    }
    if entity.starts_with(b"\n") {
        return (Vec::new(), &entity[1..]);
    }
    // Header field names are printable ASCII without ':' or spaces (RFC 5322 §3.6.8); an
    // entity whose first line is no field starts with its body (a bare JSON report).
    let first = entity.split(|b| *b == b'\n').next().unwrap_or_default();
    let is_field = first
        .iter()
        .position(|b| *b == b':')
        .is_some_and(|c| c > 0 && first[..c].iter().all(|b| (33..=126).contains(b)));
    let json_or_gzip = entity.starts_with(&[0x1f, 0x8b])
        || entity
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|b| *b == b'{' || *b == b'[');
    if !is_field || json_or_gzip {
        return (Vec::new(), entity);
    }
    let (head, body) = match end {
        Some((h, b)) => (&entity[..h], &entity[b..]),
        None => (entity, &entity[entity.len()..]),
    };
    let text = String::from_utf8_lossy(head);
    let mut headers: Headers = Vec::new();
    for line in text.split('\n') {
        let line = line.trim_end_matches('\r');
        if line.starts_with([' ', '\t']) {
            if let Some((_, v)) = headers.last_mut() {
                v.push(' ');
                v.push_str(line.trim());
            }
        } else if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    // A "header" without any field lines is body text (a bare JSON report).
    if headers.is_empty() {
        return (Vec::new(), entity);
    }
    (headers, body)
}

fn header(h: &Headers, name: &str) -> Option<String> {
    h.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
}

/// `type/subtype` lowercased, and the parameters (names lowercased, values unquoted).
fn content_type(v: &str) -> (String, Vec<(String, String)>) {
    let mut pieces = split_params(v).into_iter();
    let mime = pieces
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let params = pieces
        .filter_map(|p| {
            let (k, v) = p.split_once('=')?;
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|x| x.strip_suffix('"'))
                .unwrap_or(v);
            Some((k.trim().to_ascii_lowercase(), v.to_string()))
        })
        .collect();
    (mime, params)
}

/// Splits at `;` outside double quotes.
fn split_params(v: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut quoted = false;
    for c in v.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                if let Some(last) = out.last_mut() {
                    last.push(c);
                }
            }
            ';' if !quoted => out.push(String::new()),
            c => {
                if let Some(last) = out.last_mut() {
                    last.push(c);
                }
            }
        }
    }
    out
}

fn param(params: &[(String, String)], name: &str) -> Option<String> {
    params
        .iter()
        .find(|(k, _)| k == name || k.strip_suffix('*') == Some(name))
        .map(|(_, v)| v.clone())
}

/// The parts between `--boundary` lines (the preamble and epilogue dropped).
fn split_multipart<'a>(body: &'a [u8], boundary: &str) -> Vec<&'a [u8]> {
    let delim = format!("--{boundary}");
    let d = delim.as_bytes();
    let mut starts = Vec::new();
    let mut line_start = 0;
    let mut i = 0;
    while i <= body.len() {
        if i == body.len() || body[i] == b'\n' {
            let line = &body[line_start..i];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.starts_with(d) {
                let closing = line[d.len()..].starts_with(b"--");
                starts.push((line_start, i.min(body.len()), closing));
            }
            line_start = i + 1;
        }
        i += 1;
    }
    let mut parts = Vec::new();
    for w in starts.windows(2) {
        let (_, line_end, closing) = w[0];
        if closing {
            break;
        }
        let from = (line_end + 1).min(w[1].0);
        let mut to = w[1].0;
        // The line break before the next delimiter belongs to it.
        if to > from && body[to - 1] == b'\n' {
            to -= 1;
            if to > from && body[to - 1] == b'\r' {
                to -= 1;
            }
        }
        parts.push(&body[from..to]);
        if parts.len() >= MAX_PARTS {
            break;
        }
    }
    parts
}

/// Base64 with line breaks and stray characters ignored, padding optional.
fn decode_base64(body: &[u8]) -> Vec<u8> {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new()
            .with_decode_padding_mode(DecodePaddingMode::Indifferent)
            .with_decode_allow_trailing_bits(true),
    );
    let mut clean: Vec<u8> = body
        .iter()
        .copied()
        .filter(|b| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/')
        .collect();
    // One character left over encodes nothing.
    if clean.len() % 4 == 1 {
        clean.pop();
    }
    LENIENT.decode(&clean).unwrap_or_default()
}

/// Quoted-printable (RFC 2045 §6.7): `=XX` escapes and soft line breaks.
fn decode_qp(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        if body[i] == b'=' {
            if body[i + 1..].starts_with(b"\r\n") {
                i += 3;
                continue;
            }
            if body[i + 1..].starts_with(b"\n") {
                i += 2;
                continue;
            }
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(a), Some(b)) = (
                body.get(i + 1).and_then(|b| hex(*b)),
                body.get(i + 2).and_then(|b| hex(*b)),
            ) {
                out.push((a * 16 + b) as u8);
                i += 3;
                continue;
            }
        }
        out.push(body[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const JSON: &str = r#"{"organization-name": "Sender", "report-id": "r1",
        "date-range": {"start-datetime": "2026-12-01T00:00:00Z", "end-datetime": "2026-12-01T23:59:59Z"},
        "policies": [{"policy": {"policy-type": "tlsa", "policy-domain": "mx.moat.test",
                      "policy-string": ["3 1 1 00ff"]},
                      "summary": {"total-successful-session-count": 3, "total-failure-session-count": 1},
                      "failure-details": [{"result-type": "tlsa-invalid", "failed-session-count": 1}]}]}"#;

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn b64_lines(data: &[u8]) -> String {
        let s = base64::engine::general_purpose::STANDARD.encode(data);
        s.as_bytes()
            .chunks(76)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join("\r\n")
    }

    #[test]
    fn the_rfc_form_multipart_report_with_a_gzip_part() {
        let msg = format!(
            "From: reports@sender.example\r\nTLS-Report-Domain: moat.test\r\nTLS-Report-Submitter: Sender\r\n\
             MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=\"tlsrpt\";\r\n\tboundary=\"=_b1\"\r\n\r\n\
             preamble\r\n--=_b1\r\nContent-Type: text/plain\r\n\r\nThis is an aggregate TLS report.\r\n\
             --=_b1\r\nContent-Type: application/tlsrpt+gzip\r\nContent-Transfer-Encoding: base64\r\n\
             Content-Disposition: attachment;\r\n filename=\"sender!moat.test!1796083200!1796169599!r1.json.gz\"\r\n\r\n{}\r\n--=_b1--\r\nepilogue\r\n",
            b64_lines(&gz(JSON.as_bytes()))
        );
        let f = reports_in_message(msg.as_bytes());
        assert!(f.problems.is_empty(), "{:?}", f.problems);
        assert_eq!(f.reports.len(), 1);
        assert_eq!(f.reports[0].report_id, "r1");
        assert_eq!(f.reports[0].policies[0].policy_type, "tlsa");
        assert_eq!(f.report_domain.as_deref(), Some("moat.test"));
        assert_eq!(f.submitter.as_deref(), Some("Sender"));
    }

    #[test]
    fn other_shapes_reporters_send() {
        // Nested: multipart/mixed holding the multipart/report, LF line ends.
        let nested = format!(
            "Content-Type: multipart/mixed; boundary=outer\n\n--outer\nContent-Type: multipart/report; boundary=inner\n\n\
             --inner\nContent-Type: application/octet-stream; name=\"r.json.gz\"\nContent-Transfer-Encoding: base64\n\n{}\n--inner--\n--outer--\n",
            b64_lines(&gz(JSON.as_bytes()))
        );
        // The report as the whole body, with and without a content type.
        let bare_json = format!("Content-Type: application/tlsrpt+json\r\n\r\n{JSON}");
        let no_mime = format!("Subject: report\r\n\r\n{JSON}\r\n");
        let headerless = JSON.to_string();
        // Quoted-printable JSON, soft line breaks included.
        let qp_body = JSON
            .replace('=', "=3D")
            .replace("\"policies\"", "=\r\n\"policies\"");
        let qp = format!(
            "Content-Type: multipart/report; boundary=\"q\"\r\n\r\n--q\r\nContent-Type: application/json\r\n\
             Content-Transfer-Encoding: quoted-printable\r\n\r\n{qp_body}\r\n--q--\r\n"
        );
        // A gzip body sent as application/gzip in base64 without padding or line breaks.
        let b64 = base64::engine::general_purpose::STANDARD_NO_PAD.encode(gz(JSON.as_bytes()));
        let gzip = format!(
            "Content-Type: application/gzip\r\nContent-Transfer-Encoding: BASE64\r\n\r\n{b64}"
        );
        for (what, m) in [
            ("nested", nested),
            ("bare json", bare_json),
            ("no mime", no_mime),
            ("headerless", headerless),
            ("quoted-printable", qp),
            ("gzip", gzip),
        ] {
            let f = reports_in_message(m.as_bytes());
            assert_eq!(f.reports.len(), 1, "{what}: {:?}", f.problems);
            assert_eq!(f.reports[0].report_id, "r1", "{what}");
            assert_eq!(f.reports[0].totals(), (3, 1), "{what}");
        }
    }

    #[test]
    fn no_report_and_bad_reports_are_problems_not_panics() {
        let f = reports_in_message(b"Subject: hello\r\n\r\nJust a note, no report.\r\n");
        assert!(f.reports.is_empty());
        assert_eq!(f.problems, ["no report part found in the message"]);
        // A part that claims to be a report and is not.
        let f = reports_in_message(
            b"Content-Type: application/tlsrpt+gzip\r\nContent-Transfer-Encoding: base64\r\n\r\nAAAA\r\n",
        );
        assert!(f.reports.is_empty());
        assert_eq!(f.problems.len(), 1, "{:?}", f.problems);
        // Truncated and garbage gzip.
        let mut cut = gz(JSON.as_bytes());
        cut.truncate(cut.len() / 2);
        assert!(decode_payload(&[0x1f, 0x8b, 0, 0]).is_err());
        let _ = decode_payload(&cut);
        // Unterminated multipart, a boundary that never comes, deep nesting: no panic.
        for m in [
            &b"Content-Type: multipart/report; boundary=x\r\n\r\n--x\r\nContent-Type: application/json\r\n\r\n{"[..],
            b"Content-Type: multipart/report; boundary=x\r\n\r\nno parts",
            b"Content-Type: multipart/report\r\n\r\n--x\r\n",
            b"=",
            b"",
        ] {
            let _ = reports_in_message(m);
        }
        let mut deep = String::new();
        for i in 0..50 {
            deep.push_str(&format!(
                "Content-Type: multipart/mixed; boundary=b{i}\r\n\r\n--b{i}\r\n"
            ));
        }
        let _ = reports_in_message(deep.as_bytes());
    }

    #[test]
    fn a_gzip_bomb_stops_at_the_limit() {
        let zeros = vec![b' '; MAX_REPORT + 1024];
        let bomb = gz(&zeros);
        assert!(bomb.len() < 1024 * 1024);
        let e = decode_payload(&bomb).unwrap_err();
        assert!(e.contains("larger than 50 MiB"), "{e}");
    }
}
