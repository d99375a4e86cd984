//! `moat config check` finds what `moat serve` would trip on, naming the key and the line, and
//! `moat serve` refuses the same config with the same words.

use std::process::Command;

fn moat(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_moat"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn config_check_names_missing_files_and_colliding_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let file = d.join("moat.toml");
    let path = file.to_str().unwrap();
    let head = format!(
        "hostname = \"mx.test\"\ndata_dir = \"{}\"\n\n[[listener]]\naddress = \"127.0.17.1:2525\"\nmode = \"smtp\"\n\n",
        d.join("data").display()
    );
    // A certificate file that does not exist: config check and serve both refuse it.
    std::fs::write(
        &file,
        format!(
            "{head}[tls]\n[[tls.certificate]]\ncert = \"missing.crt\"\nkey = \"missing.key\"\n"
        ),
    )
    .unwrap();
    let (code, out) = moat(&["config", "check", path]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(":10: tls.certificate[0].cert:") && out.contains("missing.crt"),
        "{out}"
    );
    let (code, serve) = moat(&["serve", "--config", path]);
    assert_eq!(code, 1, "{serve}");
    assert!(serve.contains("tls.certificate[0].cert"), "{serve}");
    // The file alone is fine.
    let (code, out) = moat(&["config", "check", "--syntax-only", path]);
    assert_eq!(code, 0, "{out}");
    // A listener on the admin API's socket.
    std::fs::write(
        &file,
        format!("{head}[admin]\nlisten = \"127.0.17.1:2525\"\n"),
    )
    .unwrap();
    let (code, out) = moat(&["config", "check", path]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("admin[0].listen") && out.contains("already used by listener smtp"),
        "{out}"
    );
    // A type error names its key.
    std::fs::write(
        &file,
        format!("{head}[limits]\nmax_message_size = \"big\"\n"),
    )
    .unwrap();
    let (code, out) = moat(&["config", "check", path]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("limits.max_message_size: expected an integer, found string \"big\""),
        "{out}"
    );
}
