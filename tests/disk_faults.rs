//! A full disk under the spool: the server runs in a mount namespace of its own with a small
//! tmpfs mounted on its spool directory (`unshare -m` and `mount`, util-linux), fills it with
//! messages it cannot deliver yet, and must answer `451 4.3.0` to what no longer fits, keep
//! running, lose nothing it acknowledged, and deliver all of it once it can.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::dns::{Rr, serve_zone};
use common::*;

const MX_IP: &str = "127.0.18.82";

/// Sends one message of about `size` octets with `subject`; returns the final reply.
fn send(m: &Moat, subject: &str, size: usize) -> String {
    let mut tcp = raw_envelope(m.addr(SMTP), "alice@moat.test", "x@hold.test");
    assert!(raw_cmd(&mut tcp, "DATA").starts_with("354 "));
    let mut wire = format!("Subject: {subject}\r\n\r\n").into_bytes();
    let line = [b'z'; 76];
    while wire.len() < size {
        wire.extend_from_slice(&line);
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(b".\r\n");
    tcp.write_all(&wire).unwrap();
    let reply = raw_reply(&mut tcp);
    let _ = raw_cmd(&mut tcp, "QUIT");
    reply
}

/// A path inside the server's own mount namespace.
fn inside(pid: u32, path: &Path) -> PathBuf {
    let rel = path.strip_prefix("/").unwrap();
    PathBuf::from(format!("/proc/{pid}/root")).join(rel)
}

#[test]
fn a_full_spool_refuses_with_451_and_loses_nothing() {
    let mx = HoldingMx::start(MX_IP);
    let dns = serve_zone(
        "127.0.18.54",
        "hold.test",
        &[
            Rr::Mx("hold.test", 10, "mx.hold.test"),
            Rr::A("mx.hold.test", [127, 0, 18, 82]),
        ],
    );
    let extra = relay_config(dns);
    let mut m = Moat::configured("127.0.18.81", &extra, "max_message_size = 31457280");
    let spool = m.data().join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    m.launcher = ["unshare"]
        .into_iter()
        .chain(if root { vec!["-m"] } else { vec!["-r", "-m"] })
        .chain([
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            // The spool gets 32 MiB: two journal segments of 8 MiB and room for a few
            // large messages.
            "mount -t tmpfs -o size=32m moat-test-spool \"$0\" && exec \"$@\"",
        ])
        .map(str::to_string)
        .chain([spool.display().to_string()])
        .collect();
    m.spawn();
    let pid = m.child.as_ref().unwrap().id();
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    assert!(
        mounts
            .lines()
            .any(|l| l.contains(&spool.display().to_string()) && l.contains("tmpfs")),
        "the spool is on its own tmpfs: {mounts}"
    );

    // Large messages until the spool is full, then small ones.
    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    for i in 0..10 {
        let subject = format!("large {i}");
        let r = send(&m, &subject, 3 << 20);
        if r.starts_with("250 2.0.0") {
            accepted.push(subject);
        } else {
            assert!(r.starts_with("451 4.3.0"), "{subject}: {r}");
            refused.push(subject);
        }
    }
    for i in 0..5 {
        let subject = format!("small {i}");
        let r = send(&m, &subject, 2000);
        if r.starts_with("250 2.0.0") {
            accepted.push(subject);
        } else {
            assert!(r.starts_with("451 4.3.0"), "{subject}: {r}");
            refused.push(subject);
        }
    }
    println!(
        "full spool: {} accepted, {} refused with 451 4.3.0 ({refused:?})",
        accepted.len(),
        refused.len()
    );
    assert!(
        accepted.iter().any(|s| s.starts_with("large")),
        "{accepted:?}"
    );
    assert!(
        refused.iter().any(|s| s.starts_with("large")),
        "the spool filled up: {accepted:?}"
    );
    let log = m.log();
    let causes: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("No space left on device"))
        .collect();
    assert!(!causes.is_empty(), "the cause is logged");
    for l in causes.iter().take(4) {
        println!("  {l}");
    }
    // Nothing refused is left behind, and the server still answers.
    let tmp = inside(pid, &spool.join("tmp"));
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "tmp/ holds nothing"
    );
    let (ok, count) = moat_cli(&m, &["queue", "count"]);
    assert!(ok, "{count}");
    assert_eq!(
        count.trim(),
        accepted.len().to_string(),
        "every acknowledged message is queued"
    );

    // Room to deliver: the held connections close (the passes are deferred, and parking
    // them may itself meet the full disk), a real receiver takes over, and a retry runs.
    mx.release();
    let peer = plain_peer(MX_IP);
    let delivered = |log: &PeerLog| -> Vec<String> {
        log.lock()
            .unwrap()
            .iter()
            .filter_map(|(_, l)| l.strip_prefix("MESSAGE "))
            .filter_map(|b| {
                b.lines()
                    .find_map(|h| h.strip_prefix("Subject: ").map(str::to_string))
            })
            .collect()
    };
    let mut polls = 0;
    wait_for(
        "every acknowledged message delivered",
        Duration::from_secs(60),
        || {
            if polls % 20 == 0 {
                let _ = moat_cli(&m, &["queue", "retry", "--all"]);
            }
            polls += 1;
            let got = delivered(&peer);
            accepted.iter().all(|s| got.contains(s)).then_some(())
        },
    );
    let got = delivered(&peer);
    for s in &refused {
        assert!(!got.contains(s), "{s} was refused, yet delivered");
    }
    wait_for("an empty queue", Duration::from_secs(20), || {
        let (_, n) = moat_cli(&m, &["queue", "count"]);
        (n.trim() == "0").then_some(())
    });
}
