//! Feeds arbitrary bytes to the MTA-STS policy parser and, as lines of lossy UTF-8, to the TXT
//! record parser. Neither may panic, and a policy that parses must survive a round trip
//! through its canonical text unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moat::sts::policy::{parse_policy, parse_txt_records};

fuzz_target!(|data: &[u8]| {
    if let Ok(policy) = parse_policy(data) {
        let text = policy.to_text();
        assert_eq!(parse_policy(text.as_bytes()), Ok(policy));
    }
    let records: Vec<String> = String::from_utf8_lossy(data)
        .split('\n')
        .map(str::to_string)
        .collect();
    if let Ok(Some(record)) = parse_txt_records(&records) {
        assert!(!record.id.is_empty() && record.id.len() <= 32);
        assert!(record.id.bytes().all(|b| b.is_ascii_alphanumeric()));
    }
});
