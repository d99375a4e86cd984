//! TLS-RPT report mail as it arrives from anyone: the MIME walk, base64/quoted-printable,
//! gzip and the lenient JSON reader must never panic, and what they return must be bounded.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moat::tlsrpt::{mail, report};

fuzz_target!(|data: &[u8]| {
    let found = mail::reports_in_message(data);
    for r in &found.reports {
        assert!(r.policies.len() <= report::MAX_POLICIES);
        for p in &r.policies {
            assert!(p.failures.len() <= report::MAX_DETAILS);
        }
        assert!(r.organization.chars().count() <= report::MAX_TEXT);
        let _ = moat::tlsrpt::render(r);
    }
    // The JSON reader on its own, and the date reader on any text.
    let _ = report::parse(data);
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = report::parse_datetime(s);
    }
});
