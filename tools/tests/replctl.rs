//! `replctl` against real `repld` processes: certificates, status, data access,
//! verify, audit, conflicts, topology show, revocation pushed to every appliance, and
//! the refusals and bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use repl_engine::runtime::{RemoteStore, RemoteTarget};
use repl_tools::demo::{Demo, G3_LAYOUT};
use repl_wire::transport::{AllowedPeers, TlsSetup};
use repl_wire::{AuditEvent, Collection};

fn replctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_replctl")).args(args).output().expect("run replctl")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

struct Ctl {
    dir: PathBuf,
}

impl Ctl {
    fn conn(&self) -> Vec<String> {
        let p = |f: &str| self.dir.join(f).display().to_string();
        vec![
            "--ca".into(),
            p("ca.pem"),
            "--cert".into(),
            p("ops.pem"),
            "--key".into(),
            p("ops.key"),
            "--topology".into(),
            p("topology.toml"),
        ]
    }

    fn run(&self, args: &[&str]) -> Output {
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        all.extend(self.conn());
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        replctl(&refs)
    }
}

fn client_of(dir: &Path, name: &str, demo: &Demo, index: usize) -> RemoteStore {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).expect("pem");
    let tls = TlsSetup::from_pem(
        &read("ca.pem"),
        &read(&format!("{name}.pem")),
        &read(&format!("{name}.key")),
        &[],
        AllowedPeers::new([]),
    )
    .expect("tls");
    let id = demo.ids()[index].clone();
    let config = std::fs::read_to_string(dir.join(format!("{id}.toml"))).expect("config");
    let listen =
        config.lines().find(|l| l.starts_with("listen")).and_then(|l| l.split('"').nth(1)).expect("listen");
    RemoteStore::new(tls, vec![RemoteTarget { id, address: listen.parse().expect("addr") }])
        .expect("client")
        .with_timeouts(Duration::from_secs(2), Duration::from_secs(3))
}

#[test]
fn certificate_files_and_their_refusals() {
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path().to_str().expect("path");
    let out = replctl(&["certs", "init", "--dir", d, "--enterprise", "acme"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let again = replctl(&["certs", "init", "--dir", d, "--enterprise", "acme"]);
    assert_eq!(code(&again), 2, "a second CA over the first: {}", text(&again));
    assert!(text(&again).contains("already holds a CA"));
    let out = replctl(&["certs", "issue", "--dir", d, "--appliance", "a1"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(dir.path().join("a1.pem").exists() && dir.path().join("a1.key").exists());
    let bad = replctl(&["certs", "issue", "--dir", d, "--client", "no spaces allowed"]);
    assert_eq!(code(&bad), 2, "{}", text(&bad));
    let both = replctl(&["certs", "issue", "--dir", d, "--client", "x", "--admin", "y"]);
    assert_eq!(code(&both), 2, "{}", text(&both));
    let out = replctl(&[
        "certs",
        "revoke",
        "--dir",
        d,
        "--cert-file",
        dir.path().join("a1.pem").to_str().expect("p"),
    ]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let crl = std::fs::read_to_string(dir.path().join("crl.pem")).expect("crl");
    let serial = repl_wire::transport::certificate_serial(
        &std::fs::read_to_string(dir.path().join("a1.pem")).expect("pem"),
    )
    .expect("serial");
    assert_eq!(repl_wire::transport::crl_serials(&crl).expect("parse"), vec![serial]);
    let missing = replctl(&["certs", "issue", "--dir", "/nonexistent-ca-dir", "--admin", "ops"]);
    assert_eq!(code(&missing), 2);
    assert!(text(&missing).contains("nonexistent-ca-dir"), "{}", text(&missing));
    let help = replctl(&["certs", "revoke", "--help"]);
    assert_eq!(code(&help), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operating_a_running_enterprise() {
    let mut demo =
        Demo::create(PathBuf::from(env!("CARGO_BIN_EXE_repld")), None, false, G3_LAYOUT).expect("files");
    let dir = demo.dir().to_path_buf();
    let d = dir.to_str().expect("path").to_string();
    assert_eq!(code(&replctl(&["certs", "issue", "--dir", &d, "--admin", "ops"])), 0);
    assert_eq!(code(&replctl(&["certs", "issue", "--dir", &d, "--client", "victim"])), 0);
    for i in 0..4 {
        demo.start(i).expect("start");
    }
    for i in 0..4 {
        demo.wait_ready(i).await.expect("ready");
    }
    let ctl = Ctl { dir: dir.clone() };

    // Status, as a table and as JSON.
    let out = ctl.run(&["status", "--json"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    let apps = status["appliances"].as_array().expect("appliances");
    assert_eq!(apps.len(), 4);
    assert!(apps.iter().all(|a| a["reachable"] == true), "{status}");
    assert!(text(&ctl.run(&["status"])).contains("a1"));

    // Data access.
    let out = ctl.run(&["put", "--collection", "users", "alice", "{\"name\":\"Alice\"}"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let out = ctl.run(&["get", "--collection", "users", "alice", "--json"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let read: serde_json::Value = serde_json::from_slice(&out.stdout).expect("get JSON");
    assert_eq!(read["values"][0], "{\"name\":\"Alice\"}");
    let context = read["context"].to_string();
    let out = ctl.run(&["put", "--collection", "users", "alice", "v2", "--if-context", &context]);
    assert_eq!(code(&out), 0, "compare-and-set with a current context: {}", text(&out));
    let out = ctl.run(&["put", "--collection", "users", "alice", "v3", "--if-context", &context]);
    assert_eq!(code(&out), 1, "a stale context must be refused: {}", text(&out));
    let out = ctl.run(&["scan", "--collection", "users", "--json"]);
    assert_eq!(serde_json::from_slice::<Vec<String>>(&out.stdout).expect("scan"), vec!["alice".to_string()]);
    let out = ctl.run(&["delete", "--collection", "users", "alice"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_eq!(code(&ctl.run(&["get", "--collection", "users", "alice"])), 1, "deleted key still read");
    assert_eq!(code(&ctl.run(&["get", "--collection", "nope", "alice"])), 2);

    // Audit, conflicts, topology, verify.
    let agent = client_of(&dir, "victim", &demo, 0);
    let event = AuditEvent {
        time_ms: 5,
        user: "alice".into(),
        appliance: "a1".into(),
        action: "login".into(),
        detail: "x".into(),
    };
    agent.append_audit(event).await.expect("audit");
    agent.put(Collection::Users, b"bob", b"b").await.expect("put");
    let out = ctl.run(&["audit", "query", "--user", "alice"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(text(&out).contains("login"), "{}", text(&out));
    let out = ctl.run(&["audit", "verify"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_eq!(code(&ctl.run(&["conflicts", "--collection", "users"])), 0);
    let out = ctl.run(&["topology", "show"]);
    assert!(text(&out).contains("a1") && text(&out).contains("b2"), "{}", text(&out));
    let start = Instant::now();
    loop {
        let out = ctl.run(&["verify"]);
        if code(&out) == 0 {
            assert!(text(&out).contains("agree"), "{}", text(&out));
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "verify never passed: {}", text(&out));
    }

    // Revocation reaches every appliance: the revoked client is refused from then on.
    let victim_pem = dir.join("victim.pem");
    let out =
        ctl.run(&["certs", "revoke", "--dir", &d, "--cert-file", victim_pem.to_str().expect("p"), "--push"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(text(&out).contains("CRL installed"), "{}", text(&out));
    for i in 0..4 {
        let fresh = client_of(&dir, "victim", &demo, i);
        assert!(
            fresh.put(Collection::Users, b"after", b"x").await.is_err(),
            "a revoked certificate was served by {i}"
        );
    }
    assert!(
        agent.put(Collection::Users, b"live", b"x").await.is_err(),
        "a revoked live connection kept working"
    );

    // An appliance down: status says which, exit 1.
    demo.kill(3).expect("kill b2");
    let out = ctl.run(&["status"]);
    assert_eq!(code(&out), 1, "{}", text(&out));
    assert!(text(&out).contains("b2"), "{}", text(&out));
    demo.stop_all().await;

    // Missing credentials: a usage error.
    assert_eq!(code(&replctl(&["status"])), 2);
}
