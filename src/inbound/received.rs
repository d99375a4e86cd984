//! The Received header stamped on every accepted message (RFC 5321 §4.4), with the TLS
//! parameters in the form Postfix uses, and the protocol keywords of RFC 3848 / RFC 6531.

use crate::smtp::session::{Envelope, Trace};

/// Builds the header, folded, ending in CRLF. `rcpt` is named only for single-recipient
/// messages, so one copy never reveals the other (Bcc) recipients. A message sent with
/// REQUIRETLS (RFC 8689) says so in a comment after its id.
pub fn stamp(trace: &Trace, hostname: &str, id: &str, envelope: &Envelope, date: &str) -> String {
    let helo: String = trace
        .helo
        .chars()
        .map(|c| {
            if c.is_control() || c == '(' || c == ')' || c == ';' {
                '_'
            } else {
                c
            }
        })
        .collect();
    let mut h = format!("Received: from {helo} ([{}])\r\n", trace.ip);
    if let Some(tls) = &trace.tls {
        h.push_str(&format!(
            "\t(using {} with cipher {} ({}/{} bits)",
            tls.version, tls.cipher, tls.bits, tls.bits
        ));
        if let Some(kx) = &tls.key_exchange {
            h.push_str(&format!(" key-exchange {kx}"));
        }
        h.push_str(")\r\n");
    }
    h.push_str(&format!(
        "\tby {hostname} (Moat) with {} id {id}",
        trace.protocol
    ));
    if envelope.requiretls {
        h.push_str(" (REQUIRETLS)");
    }
    if let [only] = envelope.recipients.as_slice() {
        h.push_str(&format!("\r\n\tfor <{only}>"));
    }
    h.push_str(&format!("; {date}\r\n"));
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::session::TlsInfo;

    #[test]
    fn stamp_with_tls() {
        let t = Trace {
            helo: "client.test".into(),
            ip: "127.0.0.5".parse().unwrap(),
            protocol: "ESMTPS".into(),
            tls: Some(TlsInfo {
                version: "TLSv1.3".into(),
                cipher: "TLS_AES_256_GCM_SHA384".into(),
                bits: 256,
                key_exchange: Some("X25519MLKEM768".into()),
                sni: None,
                client_names: Vec::new(),
            }),
            auth_user: None,
        };
        let mut env = Envelope {
            recipients: vec!["b@mx.test".into()],
            ..Envelope::default()
        };
        let h = stamp(
            &t,
            "mx.test",
            "ABC",
            &env,
            "Mon, 23 Nov 2026 21:06:56 +0000",
        );
        assert_eq!(
            h,
            "Received: from client.test ([127.0.0.5])\r\n\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits) key-exchange X25519MLKEM768)\r\n\tby mx.test (Moat) with ESMTPS id ABC\r\n\tfor <b@mx.test>; Mon, 23 Nov 2026 21:06:56 +0000\r\n"
        );
        env.requiretls = true;
        let h = stamp(&t, "mx.test", "ABC", &env, "D");
        assert!(
            h.contains("with ESMTPS id ABC (REQUIRETLS)\r\n\tfor <b@mx.test>; D\r\n"),
            "{h}"
        );
    }

    #[test]
    fn stamp_plain_multi_rcpt_hides_recipients() {
        let t = Trace {
            helo: "evil(x);".into(),
            ip: "127.0.0.5".parse().unwrap(),
            protocol: "ESMTP".into(),
            tls: None,
            auth_user: None,
        };
        let env = Envelope {
            recipients: vec!["a@x".into(), "b@x".into()],
            ..Envelope::default()
        };
        let h = stamp(&t, "mx.test", "ABC", &env, "D");
        assert_eq!(
            h,
            "Received: from evil_x__ ([127.0.0.5])\r\n\tby mx.test (Moat) with ESMTP id ABC; D\r\n"
        );
    }
}
