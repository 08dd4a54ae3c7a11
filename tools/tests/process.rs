//! Real `repld` processes on loopback: configuration errors, replication between
//! three appliances through a SIGKILL and restart, a foreign certificate refused and
//! logged, and the G4 demo (failover to the other database appliance without losing
//! an acknowledged write) end to end.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use repl_engine::topology::Role;
use repl_tools::demo::{http_get, Demo};
use repl_wire::transport::{CertificateAuthority, Identity, Validity};
use repl_wire::Collection;

fn repld() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_repld"))
}

fn run_repld(args: &[&str]) -> Output {
    Command::new(repld()).args(args).output().expect("run repld")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A three-appliance G3 enterprise plus `b2`, whose certificate comes from another CA.
const LAYOUT: &[(&str, &str, &[Role])] =
    &[("a1", "a", &[Role::Audit]), ("a2", "a", &[]), ("b1", "b", &[Role::Audit]), ("b2", "b", &[])];

fn config_of(dir: &Path, id: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{id}.toml"))).expect("config")
}

#[test]
fn a_bad_configuration_names_the_file_and_field_and_exits_2() {
    let demo = Demo::create(repld(), None, false, LAYOUT).expect("files");
    let dir = demo.dir();
    let good = config_of(dir, "a1");
    let cases: Vec<(&str, String, &str)> = vec![
        ("missing field", good.replace("listen = ", "# listen = "), "listen"),
        ("unknown field", format!("colour = \"red\"\n{good}"), "colour"),
        ("bad address", good.replace("listen = \"127.0.0.1:", "listen = \"nowhere:"), "listen"),
        ("not in topology", good.replace("appliance = \"a1\"", "appliance = \"zz9\""), "appliance"),
        ("wrong site", good.replace("site = \"a\"", "site = \"b\""), "site"),
        (
            "metrics beyond loopback",
            good.replace("metrics = \"127.0.0.1:", "metrics = \"10.9.9.9:"),
            "metrics",
        ),
        ("missing certificate", good.replace("cert = \"a1.pem\"", "cert = \"nope.pem\""), "tls.cert"),
        (
            "retention below its minimum",
            format!("{good}\n[maintenance]\nlog_retained_mib = 8\n"),
            "maintenance.log_retained_mib",
        ),
        ("unknown maintenance field", format!("{good}\n[maintenance]\ncompact_every = 5\n"), "compact_every"),
    ];
    for (what, text, field) in cases {
        let file = dir.join(format!("bad-{}.toml", what.replace(' ', "-")));
        std::fs::write(&file, text).expect("write");
        let out = run_repld(&["--config", file.to_str().expect("utf-8 path")]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{what}: {err}");
        assert!(err.contains(&file.display().to_string()), "{what}: error does not name the file: {err}");
        assert!(err.contains(field), "{what}: error does not name `{field}`: {err}");
        assert!(!err.contains("panicked"), "{what}: {err}");
    }
    // The documented example is a valid configuration.
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/repld.toml");
    let out = run_repld(&["check", "--config", example.to_str().expect("path")]);
    assert!(out.status.success(), "the example configuration: {}", stderr(&out));
    // A missing file, a bad argument.
    let out = run_repld(&["--config", dir.join("absent.toml").to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("absent.toml"), "{}", stderr(&out));
    let out = run_repld(&["--frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--frobnicate"));

    // The listen port in use: a clear error and exit 2.
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let listen_line = good.lines().find(|l| l.starts_with("listen")).expect("listen line").to_string();
    let file = dir.join("port-in-use.toml");
    std::fs::write(&file, good.replace(&listen_line, &format!("listen = \"127.0.0.1:{port}\"")))
        .expect("write");
    let out = run_repld(&["--config", file.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("cannot listen"), "{}", stderr(&out));
}

async fn wait_for(what: &str, within: Duration, mut check: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < within, "timed out after {within:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_appliances_replicate_through_a_sigkill_and_a_foreign_certificate_is_refused() {
    let mut demo = Demo::create(repld(), None, false, LAYOUT).expect("files");
    // b2 presents a certificate of another CA.
    let rogue = CertificateAuthority::create("elsewhere", Validity::days_from_now(1)).expect("ca");
    let ids = demo.ids();
    let cert = rogue.issue(&Identity::Appliance(ids[3].clone()), Validity::days_from_now(1)).expect("issue");
    std::fs::write(demo.dir().join("b2.pem"), &cert.cert_pem).expect("write");
    std::fs::write(demo.dir().join("b2.key"), &cert.key_pem).expect("write");
    for i in 0..4 {
        demo.start(i).expect("start");
    }
    for i in 0..4 {
        demo.wait_ready(i).await.expect("ready");
    }
    let agent = |ids: &[&repl_wire::NodeId]| demo.client(Identity::Client("t".into()), ids).expect("client");
    let on_a1 = agent(&[&ids[0]]);
    let on_a2 = agent(&[&ids[1]]);
    let on_b1 = agent(&[&ids[2]]);
    for i in 0..100u32 {
        on_a1.put(Collection::Users, format!("u{i}").as_bytes(), b"v").await.expect("put");
    }
    let all_on = |c: &repl_engine::runtime::RemoteStore, n: u32| {
        let c = c.clone();
        async move {
            for i in 0..n {
                match c.get(Collection::Users, format!("u{i}").as_bytes()).await {
                    Ok((values, _)) if !values.is_empty() => {}
                    _ => return false,
                }
            }
            true
        }
    };
    wait_for("the users on a2 and b1", Duration::from_secs(30), async || {
        all_on(&on_a2, 100).await && all_on(&on_b1, 100).await
    })
    .await;

    // a2 is killed mid-workload; a1 keeps taking writes; a2 comes back and catches up.
    let writer = {
        let on_a1 = on_a1.clone();
        tokio::spawn(async move {
            for i in 100..300u32 {
                on_a1.put(Collection::Users, format!("u{i}").as_bytes(), b"v").await.expect("put");
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    demo.kill(1).expect("kill a2");
    writer.await.expect("writer");
    demo.start(1).expect("restart a2");
    demo.wait_ready(1).await.expect("a2 ready");
    wait_for("every user on a2 and b1", Duration::from_secs(60), async || {
        all_on(&on_a2, 300).await && all_on(&on_b1, 300).await
    })
    .await;

    // The foreign appliance was refused, the refusal logged, and it holds nothing.
    let start = Instant::now();
    while !(0..3).any(|i| demo.log(i).contains("UnknownIssuer")) {
        assert!(start.elapsed() < Duration::from_secs(30), "no refusal logged:\n{}", demo.log(0));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = http_get(demo.metrics(3), "/metrics").await.expect("b2 metrics");
    let received: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            l.starts_with("repl_entries_total{") && l.contains("direction=\"in\"") && !l.ends_with(" 0")
        })
        .collect();
    assert!(received.is_empty(), "b2 received entries: {received:?}");
    assert!(metrics.contains("repl_peer_connected{appliance=\"b2\",peer=\"a1\"} 0"), "{metrics}");
    demo.stop_all().await;
    assert!(demo.all_passed(), "an appliance did not stop cleanly");
}

#[test]
fn the_g4_demo_fails_over_without_losing_an_acknowledged_write() {
    let out = run_repld(&["demo", "--g4", "--writes", "120"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed:\n{text}\n{}", stderr(&out));
    assert!(text.contains("killed db1 with SIGKILL"), "{text}");
    assert!(text.contains("every acknowledged enterprise write is on db1"), "{text}");
    assert!(text.contains("checks passed"), "{text}");
    assert!(!text.contains("FAIL"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_appliance_joins_through_a_member_and_keeps_the_topology() {
    let mut demo = Demo::create(repld(), None, false, LAYOUT).expect("files");
    let dir = demo.dir().to_path_buf();
    let a1_listen =
        config_of(&dir, "a1").lines().find(|l| l.starts_with("listen")).expect("listen").to_string();
    let a1_address = a1_listen.split('"').nth(1).expect("address").to_string();
    let b2 = config_of(&dir, "b2").replace(
        "topology_file = \"topology.toml\"",
        &format!("[join]\nappliance = \"a1\"\naddress = \"{a1_address}\"\n"),
    );
    // [join] must come after the top-level keys: move it to the end.
    let (head, tls) = b2.split_once("[tls]").expect("tls table");
    let (top, join) = head.split_once("[join]").expect("join table");
    std::fs::write(dir.join("b2.toml"), format!("{top}[tls]{tls}\n[join]{join}")).expect("write");
    for i in 0..4 {
        demo.start(i).expect("start");
    }
    for i in 0..4 {
        demo.wait_ready(i).await.expect("ready");
    }
    assert!(dir.join("data/b2/topology.bin").exists(), "the joined topology was not kept");
    let ids = demo.ids();
    let on_a1 = demo.client(Identity::Client("t".into()), &[&ids[0]]).expect("client");
    let on_b2 = demo.client(Identity::Client("t".into()), &[&ids[3]]).expect("client");
    on_a1.put(Collection::Users, b"joined", b"yes").await.expect("put");
    wait_for(
        "the user on b2",
        Duration::from_secs(30),
        async || matches!(on_b2.get(Collection::Users, b"joined").await, Ok((v, _)) if !v.is_empty()),
    )
    .await;
    demo.stop_all().await;
    assert!(demo.all_passed(), "an appliance did not stop cleanly");
}

/// Three appliances of one site, so every stream flows between all three.
const ONE_SITE: &[(&str, &str, &[Role])] =
    &[("a1", "a", &[Role::Audit]), ("a2", "a", &[]), ("a3", "a", &[Role::Audit])];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_appliances_catch_up_and_send_again_after_they_resume() {
    // While one appliance is stopped (SIGSTOP), the others keep taking 2 KiB writes:
    // their streams to it fill its flow-control windows, and each relays the other's
    // entries, which it appears to lack. When it resumes it owes them its own backlog
    // and relays at once: both sides of every session must keep reading while they
    // write, or two full windows wait on each other forever.
    let mut demo = Demo::create(repld(), None, false, ONE_SITE).expect("files");
    for i in 0..3 {
        demo.start(i).expect("start");
    }
    for i in 0..3 {
        demo.wait_ready(i).await.expect("ready");
    }
    let ids = demo.ids();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let written = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..6usize {
        // Each writer fails over to the next appliance while its own is paused.
        let targets = [&ids[w % 3], &ids[(w + 1) % 3]];
        let client = demo.client(Identity::Client(format!("w{w}")), &targets).expect("client");
        let (stop, written) = (stop.clone(), written.clone());
        writers.push(tokio::spawn(async move {
            let mut keys = Vec::new();
            let value = vec![b'x'; 2048];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = format!("w{w}-{}", keys.len());
                client.put(Collection::Users, key.as_bytes(), &value).await.expect("put");
                written.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                keys.push(key);
            }
            keys
        }));
    }
    let wait_written = async |n: u64| {
        wait_for("writes", Duration::from_secs(120), async || {
            written.load(std::sync::atomic::Ordering::Relaxed) >= n
        })
        .await
    };
    wait_written(500).await;
    for paused in [1, 0, 2] {
        demo.signal(paused, rustix::process::Signal::STOP);
        // Paused until far more than a stream's flow-control window (1.25 MB) was
        // written past it, then resumed under the same load.
        wait_written(written.load(std::sync::atomic::Ordering::Relaxed) + 1_000).await;
        demo.signal(paused, rustix::process::Signal::CONT);
        wait_written(written.load(std::sync::atomic::Ordering::Relaxed) + 300).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut keys = Vec::new();
    for w in writers {
        keys.extend(w.await.expect("writer"));
    }
    let lag =
        repl_tools::demo::converge(&demo, repl_wire::StreamId::Enterprise, Duration::from_secs(60)).await;
    assert!(lag.is_ok(), "{lag:?}");
    for (i, id) in ids.iter().enumerate() {
        let reader = demo.client(Identity::Client("check".into()), &[id]).expect("client");
        for key in &keys {
            let (values, _) = reader.get(Collection::Users, key.as_bytes()).await.expect("get");
            assert!(!values.is_empty(), "{id} lacks {key}\n{}", demo.log(i));
        }
    }
    demo.stop_all().await;
    assert!(demo.all_passed(), "an appliance did not stop cleanly");
}
