//! `repl-soak` end to end: real processes killed and paused under load, then every
//! acknowledged write checked on every appliance that should hold it.

use std::process::Command;

#[test]
fn a_short_soak_loses_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    let out = Command::new(env!("CARGO_BIN_EXE_repl-soak"))
        .args(["--duration", "20", "--seed", "11", "--dir"])
        .arg(dir.path())
        .output()
        .expect("run repl-soak");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert!(text.contains("no violation"), "{text}");
    assert!(text.contains(" kill ") || text.contains(" pause "), "no fault was injected: {text}");
    let csv = std::fs::read_to_string(dir.path().join("soak.csv")).expect("time series");
    assert!(csv.lines().count() > 10, "{csv}");
    assert!(csv.starts_with("t_s,acked_ops,failed_ops,faults,a1_rss_kib"), "{csv}");
}
