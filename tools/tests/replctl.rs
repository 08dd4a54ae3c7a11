//! `replctl` against real `repld` processes: certificates, status, data access,
//! verify, audit, conflicts, topology show, revocation pushed to every appliance, and
//! the refusals and bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use repl_engine::runtime::{ClientError, RemoteStore, RemoteTarget};
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

    fn run_async(&self, args: &[&str]) -> std::process::Child {
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        all.extend(self.conn());
        Command::new(env!("CARGO_BIN_EXE_replctl"))
            .args(&all)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn replctl")
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
    for id in demo.ids() {
        let file = dir.join(format!("{id}.toml"));
        let config = std::fs::read_to_string(&file).expect("config");
        std::fs::write(&file, format!("keep_siblings = [\"user-policies\"]\n{config}")).expect("write");
    }
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
    // Concurrent writes to a sibling-keeping collection are listed as a sibling set.
    agent.put(Collection::UserPolicies, b"p1", b"first").await.expect("put");
    let (_, before) = agent.get(Collection::UserPolicies, b"p1").await.expect("get");
    agent.put(Collection::UserPolicies, b"p1", b"second").await.expect("put");
    agent.put_with_context(Collection::UserPolicies, b"p1", b"third", &before).await.expect("concurrent put");
    let out = ctl.run(&["conflicts", "--collection", "user-policies", "--appliance", "a1", "--json"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let values = report["siblings"][0]["values"].as_array().expect("a sibling set");
    assert_eq!(values.len(), 2, "{report}");
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
    // 44: certificate_revoked, the TLS alert each appliance answers the handshake with.
    for i in 0..4 {
        let fresh = client_of(&dir, "victim", &demo, i);
        match fresh.put(Collection::Users, b"after", b"x").await {
            Err(ClientError::Certificate { alert: 44, .. }) => {}
            other => panic!("a revoked certificate at appliance {i}: {other:?}"),
        }
    }
    match agent.put(Collection::Users, b"live", b"x").await {
        Err(ClientError::Certificate { alert: 44, .. }) => {}
        other => panic!("a revoked live connection: {other:?}"),
    }

    // An appliance whose certificate is revoked is cut off from its peers: the
    // replicas diverge, and verify fails naming the key.
    assert_eq!(code(&replctl(&["certs", "issue", "--dir", &d, "--client", "agent2"])), 0);
    let a2_pem = dir.join("a2.pem");
    let out =
        ctl.run(&["certs", "revoke", "--dir", &d, "--cert-file", a2_pem.to_str().expect("p"), "--push"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let agent2 = client_of(&dir, "agent2", &demo, 0);
    agent2.put(Collection::Users, b"diverge", b"x").await.expect("put on a1");
    let out = ctl.run(&["verify", "--stream", "enterprise"]);
    assert_eq!(code(&out), 1, "{}", text(&out));
    assert!(text(&out).contains("users/diverge"), "{}", text(&out));

    // An appliance down: status says which, exit 1.
    demo.kill(3).expect("kill b2");
    let out = ctl.run(&["status"]);
    assert_eq!(code(&out), 1, "{}", text(&out));
    assert!(text(&out).contains("b2"), "{}", text(&out));
    demo.stop_all().await;

    // Missing credentials: a usage error.
    assert_eq!(code(&replctl(&["status"])), 2);
}

fn listing(dir: &Path) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().map_or(0, |m| m.len())))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_load_restores_one_appliance_and_its_old_incarnation_is_refused() {
    const THREE: &[(&str, &str, &[repl_engine::topology::Role])] = &[
        ("a1", "a", &[repl_engine::topology::Role::Audit]),
        ("a2", "a", &[]),
        ("b1", "b", &[repl_engine::topology::Role::Audit]),
    ];
    let mut demo =
        Demo::create(PathBuf::from(env!("CARGO_BIN_EXE_repld")), None, false, THREE).expect("files");
    let dir = demo.dir().to_path_buf();
    let d = dir.to_str().expect("path").to_string();
    assert_eq!(code(&replctl(&["certs", "issue", "--dir", &d, "--admin", "ops"])), 0);
    assert_eq!(code(&replctl(&["certs", "issue", "--dir", &d, "--client", "agent"])), 0);
    for i in 0..3 {
        demo.start(i).expect("start");
    }
    for i in 0..3 {
        demo.wait_ready(i).await.expect("ready");
    }
    let ctl = Ctl { dir: dir.clone() };
    let writer = client_of(&dir, "agent", &demo, 0);
    for i in 0..100u32 {
        writer.put(Collection::Users, format!("before-{i}").as_bytes(), b"v").await.expect("put");
    }

    // The backup of a2 is taken while a1 keeps writing.
    let load = {
        let writer = writer.clone();
        tokio::spawn(async move {
            for i in 0..300u32 {
                writer.put(Collection::Users, format!("during-{i}").as_bytes(), b"v").await.expect("put");
            }
        })
    };
    let file = dir.join("a2.backup");
    let out = ctl.run(&["backup", "--appliance", "a2", file.to_str().expect("p")]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    load.await.expect("load");
    for i in 0..100u32 {
        writer.put(Collection::Users, format!("after-{i}").as_bytes(), b"v").await.expect("put");
    }

    // Refusals: a2 is running; a damaged and a truncated file change nothing.
    let a2_config = dir.join("a2.toml");
    let restore =
        |f: &Path| replctl(&["restore", "--config", a2_config.to_str().expect("p"), f.to_str().expect("p")]);
    let running = restore(&file);
    assert_eq!(code(&running), 2, "{}", text(&running));
    assert!(text(&running).contains("running"), "{}", text(&running));
    assert!(demo.stop(1).await, "a2 did not stop cleanly");
    let store_dir = dir.join("data/a2/store");
    let before = listing(&store_dir);
    let bytes = std::fs::read(&file).expect("backup");
    let mut damaged = bytes.clone();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x40;
    let damaged_file = dir.join("damaged.backup");
    std::fs::write(&damaged_file, &damaged).expect("write");
    let out = restore(&damaged_file);
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(text(&out).contains("checksum"), "{}", text(&out));
    let truncated_file = dir.join("truncated.backup");
    std::fs::write(&truncated_file, &bytes[..bytes.len() - 100]).expect("write");
    let out = restore(&truncated_file);
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(text(&out).contains("truncated"), "{}", text(&out));
    assert_eq!(listing(&store_dir), before, "a refused restore changed the store");

    // Keep the old incarnation's data to play a zombie later; restore; start again.
    let zombie = dir.join("data/a2-old");
    assert!(Command::new("cp")
        .arg("-a")
        .arg(dir.join("data/a2"))
        .arg(&zombie)
        .status()
        .expect("cp")
        .success());
    let out = restore(&file);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(text(&out).contains("new incarnation") || text(&out).contains("incarnation"), "{}", text(&out));
    demo.start(1).expect("restart a2");
    demo.wait_ready(1).await.expect("a2 ready");

    // Every acknowledged write is back on a2 and the replicas agree.
    let on_a2 = client_of(&dir, "agent", &demo, 1);
    let start = Instant::now();
    'outer: loop {
        assert!(start.elapsed() < Duration::from_secs(60), "a2 did not get every write back");
        for (prefix, n) in [("before", 100u32), ("during", 300), ("after", 100)] {
            for i in 0..n {
                match on_a2.get(Collection::Users, format!("{prefix}-{i}").as_bytes()).await {
                    Ok((v, _)) if !v.is_empty() => {}
                    _ => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue 'outer;
                    }
                }
            }
        }
        break;
    }
    let start = Instant::now();
    loop {
        let out = ctl.run(&["verify"]);
        if code(&out) == 0 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "verify after the restore: {}", text(&out));
    }

    // The old incarnation comes back (a zombie on the old data): refused and logged.
    assert!(demo.stop(1).await);
    std::fs::rename(dir.join("data/a2"), dir.join("data/a2-new")).expect("move");
    std::fs::rename(&zombie, dir.join("data/a2")).expect("move");
    demo.start(1).expect("start the zombie");
    demo.wait_ready(1).await.expect("zombie ready");
    let start = Instant::now();
    while !(demo.log(0).contains("retired incarnation") || demo.log(2).contains("retired incarnation")) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the old incarnation was not refused:\n{}",
            demo.log(0)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    demo.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_changes_by_two_phase_commit() {
    let mut demo =
        Demo::create(PathBuf::from(env!("CARGO_BIN_EXE_repld")), None, false, G3_LAYOUT).expect("files");
    let dir = demo.dir().to_path_buf();
    let d = dir.to_str().expect("path").to_string();
    assert_eq!(code(&replctl(&["certs", "issue", "--dir", &d, "--admin", "ops"])), 0);
    assert_eq!(code(&replctl(&["certs", "issue", "--dir", &d, "--client", "agent"])), 0);
    // b2 is not in the enterprise yet: it joins through a1 and waits to be added.
    let topology_file = dir.join("topology.toml");
    let mut topology = repl_tools::config::read_topology(&topology_file).expect("topology");
    let b2 = topology.appliances.pop().expect("b2");
    std::fs::write(&topology_file, toml::to_string(&topology).expect("toml")).expect("write");
    let a1_address = topology.appliances[0].address;
    let config = std::fs::read_to_string(dir.join("b2.toml")).expect("config");
    let config = config.replace("topology_file = \"topology.toml\"\n", "");
    std::fs::write(
        dir.join("b2.toml"),
        format!("{config}\n[join]\nappliance = \"a1\"\naddress = \"{a1_address}\"\n"),
    )
    .expect("write");
    for i in 0..3 {
        demo.start(i).expect("start");
    }
    for i in 0..3 {
        demo.wait_ready(i).await.expect("ready");
    }
    let writer = client_of(&dir, "agent", &demo, 0);
    for i in 0..200u32 {
        writer.put(Collection::Users, format!("u{i}").as_bytes(), b"v").await.expect("put");
    }
    demo.start(3).expect("start b2");
    demo.wait_ready(3).await.expect("b2 ready");
    let ctl = Ctl { dir: dir.clone() };

    // Add b2: committed everywhere; b2 bootstraps every user by snapshot.
    let address = b2.address.to_string();
    let out = ctl.run(&["topology", "add-appliance", "--id", "b2", "--site", "b", "--address", &address]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(text(&out).contains("epoch 2"), "{}", text(&out));
    let on_b2 = client_of(&dir, "agent", &demo, 3);
    let start = Instant::now();
    'users: loop {
        assert!(start.elapsed() < Duration::from_secs(60), "b2 did not bootstrap");
        for i in 0..200u32 {
            if !matches!(on_b2.get(Collection::Users, format!("u{i}").as_bytes()).await, Ok((v, _)) if !v.is_empty())
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue 'users;
            }
        }
        break;
    }
    let out = ctl.run(&["status", "--json"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(status["appliances"].as_array().expect("list").iter().all(|a| a["epoch"] == 2), "{status}");

    // Rename a site; the change reaches every appliance.
    let out = ctl.run(&["topology", "rename-site", "--site", "a", "--name", "Head office"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let out = ctl.run(&["topology", "show", "--appliance", "b2"]);
    assert!(text(&out).contains("Head office"), "{}", text(&out));

    // Two concurrent changes: never both; the refused one says why.
    let (x, y) = (
        ctl.run_async(&["topology", "rename-site", "--site", "b", "--name", "X"]),
        ctl.run_async(&["topology", "rename-site", "--site", "b", "--name", "Y"]),
    );
    let (x, y) = (x.wait_with_output().expect("x"), y.wait_with_output().expect("y"));
    // Both may succeed only one after the other (the second started once the first
    // had committed, at the next epoch); two winners of one epoch never.
    let epoch = |o: &std::process::Output| {
        text(o).split("topology epoch ").nth(1).and_then(|r| r.split_whitespace().next()).map(str::to_string)
    };
    if code(&x) == 0 && code(&y) == 0 {
        assert_ne!(epoch(&x), epoch(&y), "two concurrent changes both won:\n{}\n{}", text(&x), text(&y));
    } else {
        let refused = if code(&x) == 0 { &y } else { &x };
        assert_eq!(code(refused), 1, "{}", text(refused));
        assert!(text(refused).contains("refused"), "{}", text(refused));
    }

    // With an appliance down, a change is refused and names it.
    demo.kill(1).expect("kill a2");
    let out = ctl.run(&["topology", "remove-appliance", "b2"]);
    assert_eq!(code(&out), 1, "{}", text(&out));
    assert!(text(&out).contains("a2"), "{}", text(&out));
    demo.start(1).expect("restart a2");
    demo.wait_ready(1).await.expect("a2 ready");

    // Remove b2: the others refuse it from then on.
    let start = Instant::now();
    loop {
        let out = ctl.run(&["topology", "remove-appliance", "b2"]);
        if code(&out) == 0 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "remove refused: {}", text(&out));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let on_a1 = client_of(&dir, "agent", &demo, 0);
    on_a1.put(Collection::Users, b"after-removal", b"v").await.expect("put");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !matches!(on_b2.get(Collection::Users, b"after-removal").await, Ok((v, _)) if !v.is_empty()),
        "a removed appliance still receives writes"
    );
    demo.stop_all().await;
}
