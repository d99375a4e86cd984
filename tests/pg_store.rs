//! The queue store boundary: one contract, run against the embedded journal and against
//! PostgreSQL (a private cluster started for the test), then what only a shared store has:
//! leases between nodes, schema versions, and Moat nodes sharing one queue, a killed node's
//! mail delivered by another.

mod common;

use std::io::Read;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::postgres::Cluster;
use common::{Client, Moat, SMTP};
use moat::config::Config;
use moat::policy::cause::Cause;
use moat::queue::pg::PgStore;
use moat::queue::spool::Spool;
use moat::queue::state::{MessageState, RcptState};
use moat::queue::store::Store;
use moat::smtp::session::Envelope;

fn envelope(to: &[&str]) -> Envelope {
    Envelope {
        sender: "alice@sender.test".into(),
        recipients: to.iter().map(|s| s.to_string()).collect(),
        dsn: vec![Default::default(); to.len()],
        envid: Some("env-1".into()),
        ret_full: Some(true),
        ..Envelope::default()
    }
}

fn qid(n: u64) -> String {
    format!("{n:016X}")
}

/// What every store must do, whatever keeps the bytes.
async fn contract(store: Arc<dyn Store>, base: u64) {
    let now = moat::util::unix_now();
    let (a, b, c) = (qid(base + 1), qid(base + 2), qid(base + 3));
    let env_a = envelope(&["bob@a.test", "carol@b.test"]);
    let body_a = b"Received: by test\r\nSubject: a\r\n\r\nhello\r\n".to_vec();
    store.store(&a, now, &env_a, &body_a).await.unwrap();
    store
        .store(
            &b,
            now,
            &envelope(&["dave@b.test"]),
            b"Subject: b\r\n\r\nx\r\n",
        )
        .await
        .unwrap();
    assert_eq!(store.count().await.unwrap(), 2);
    assert_eq!(store.list().await.unwrap(), vec![a.clone(), b.clone()]);
    assert_eq!(store.with_domain("a.test").await.unwrap(), vec![a.clone()]);
    assert_eq!(
        store.with_domain("b.test").await.unwrap(),
        vec![a.clone(), b.clone()]
    );
    assert!(store.with_domain("none.test").await.unwrap().is_empty());
    assert!(store.exists(&a).await.unwrap());
    assert!(!store.exists(&qid(base + 9)).await.unwrap());

    // Read back exactly as written, every recipient pending.
    let (m, st) = store.load(&a).await.unwrap();
    assert_eq!(m.envelope, env_a);
    assert_eq!(m.message, body_a);
    assert_eq!(m.arrived, now);
    assert_eq!(st, MessageState::new(2));

    // A pass that delivers one recipient and defers the other keeps the message with both
    // outcomes; every field of the state survives.
    let mut st = MessageState::new(2);
    st.rcpts[0].state = RcptState::Delivered;
    st.rcpts[0].status = "2.0.0".into();
    st.rcpts[0].remote = Some("mx.a.test".into());
    st.rcpts[0].reason = "250 ok".into();
    st.rcpts[1].state = RcptState::Deferred;
    st.rcpts[1].attempts = 3;
    st.rcpts[1].next_attempt = now + 600;
    st.rcpts[1].security = true;
    st.rcpts[1].status = "4.4.317".into();
    st.rcpts[1].cause = Some(Cause::StartTlsNotOffered);
    st.rcpts[1].remote = Some("mx.b.test".into());
    st.rcpts[1].reason = "STARTTLS not offered by mx.b.test".into();
    st.rcpts[1].warned = true;
    store.finish(&a, st.clone()).await.unwrap();
    let (_, back) = store.load(&a).await.unwrap();
    assert_eq!(back, st);
    assert_eq!(back.next_due(), Some(now + 600));

    // save_state (the administrator's retry) keeps the message too.
    let mut retry = back.clone();
    retry.rcpts[1].next_attempt = 0;
    store.save_state(&a, &retry).await.unwrap();
    assert_eq!(store.load(&a).await.unwrap().1, retry);

    // Counts by state, where the store counts itself (the database), agree with the loads.
    let counted = store.by_state().await.unwrap();
    assert_eq!(counted.is_some(), store.kind() == "postgres");
    if let Some((messages, by)) = counted {
        assert_eq!(messages, store.count().await.unwrap());
        let get = |s: RcptState| by.iter().find(|c| c.0 == s).map(|c| c.1);
        assert_eq!(get(RcptState::Delivered), Some(1), "{by:?}");
        assert_eq!(get(RcptState::Deferred), Some(1), "{by:?}");
        assert_eq!(get(RcptState::Failed), None, "{by:?}");
        let pending = get(RcptState::Pending).unwrap_or(0);
        let mut loaded = 0;
        for id in store.list().await.unwrap() {
            let (_, st) = store.load(&id).await.unwrap();
            loaded += st
                .rcpts
                .iter()
                .filter(|r| r.state == RcptState::Pending)
                .count();
        }
        assert_eq!(pending, loaded as u64, "{by:?}");
        assert!(by.iter().all(|c| c.2 < 3600), "{by:?}");
    }

    // All final: gone.
    let mut done = MessageState::new(1);
    done.rcpts[0].state = RcptState::Failed;
    store.finish(&b, done).await.unwrap();
    assert!(!store.exists(&b).await.unwrap());
    let e = store.load(&b).await.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");

    // Streamed in parts (a large message), committed, read back whole.
    let env_c = envelope(&["erin@c.test"]);
    let store2 = store.clone();
    let (c2, env2) = (c.clone(), env_c.clone());
    let mut incoming = tokio::task::spawn_blocking(move || {
        let mut inc = store2.begin(&c2, now, &env2).unwrap();
        inc.append(b"Received: by test\r\n").unwrap();
        inc.append(&vec![b'x'; 3 << 20]).unwrap();
        inc
    })
    .await
    .unwrap();
    incoming.append(b"\r\n").unwrap();
    store.commit(incoming, b"end\r\n".to_vec()).await.unwrap();
    let (m, _) = store.load(&c).await.unwrap();
    assert_eq!(m.envelope, env_c);
    assert_eq!(m.message.len(), 19 + (3 << 20) + 2 + 5);
    assert!(m.message.ends_with(b"\r\nend\r\n"));

    // Removal, and removal of what is not there.
    store.remove(&a).await.unwrap();
    store.remove(&c).await.unwrap();
    assert_eq!(
        store.remove(&a).await.unwrap_err().kind(),
        std::io::ErrorKind::NotFound
    );
    assert_eq!(store.count().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_embedded_journal() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, existing) = Spool::open(dir.path()).unwrap();
    assert!(existing.is_empty());
    contract(Arc::new(spool), 0x1000).await;
}

fn pg_config(cluster: &Cluster, data: &std::path::Path, node: &str) -> Config {
    Config::parse(
        &format!(
            r#"hostname = "{node}.moat.test"
data_dir = "{}"
[[listener]]
name = "smtp"
address = "127.0.27.1:2525"
mode = "smtp"
[queue]
store = "postgres"
[postgres]
url = "{}"
node_id = "{node}"
lease_secs = 10
"#,
            data.display(),
            cluster.url()
        ),
        "test.toml",
    )
    .unwrap()
}

async fn sql(cluster: &Cluster, statement: &str) {
    let (client, conn) = tokio_postgres::connect(&cluster.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client.batch_execute(statement).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_postgres_and_leases() {
    let cluster = Cluster::start("127.0.27.1");
    let dir = tempfile::tempdir().unwrap();
    let one = PgStore::open(&pg_config(&cluster, &dir.path().join("one"), "one"))
        .await
        .unwrap();
    assert_eq!(
        moat::queue::pg::schema_version(one.pool()).await.unwrap(),
        moat::queue::pg::SCHEMA_VERSION
    );
    contract(Arc::new(one.clone()), 0x2000).await;

    // A second node on the same database.
    let two = PgStore::open(&pg_config(&cluster, &dir.path().join("two"), "two"))
        .await
        .unwrap();
    let nodes = moat::queue::pg::nodes(one.pool()).await.unwrap();
    let mut ids: Vec<&str> = nodes.iter().map(|n| n.id.as_str()).collect();
    ids.sort();
    assert_eq!(ids, ["one", "two"]);

    // The node that accepts a message holds its lease: no other node may take or claim it.
    let now = moat::util::unix_now();
    let m = qid(0x3001);
    one.store(&m, now, &envelope(&["x@far.test"]), b"Subject: m\r\n\r\n")
        .await
        .unwrap();
    assert!(one.take(&m).await.unwrap());
    assert!(
        !two.take(&m).await.unwrap(),
        "taken while node one holds it"
    );
    assert!(two.claim_due(10).await.unwrap().is_empty());

    // Deferred and due again: released, so the next free node claims it, once.
    let mut st = MessageState::new(1);
    st.rcpts[0].state = RcptState::Deferred;
    st.rcpts[0].attempts = 1;
    st.rcpts[0].next_attempt = now.saturating_sub(1);
    one.finish(&m, st.clone()).await.unwrap();
    assert_eq!(two.claim_due(10).await.unwrap(), vec![m.clone()]);
    assert!(two.claim_due(10).await.unwrap().is_empty(), "claimed twice");
    assert!(
        !one.take(&m).await.unwrap(),
        "node one took node two's lease"
    );

    // Node two "dies" holding it: its lease runs out (aged here in the database rather than
    // waited for) and node one claims the message.
    sql(
        &cluster,
        &format!("UPDATE moat_message SET lease_until = lease_until - 3600 WHERE id = '{m}'"),
    )
    .await;
    assert_eq!(one.claim_due(10).await.unwrap(), vec![m.clone()]);
    // Node two finishing late is told its lease was lost (counted), and the state it wrote
    // does not take the lease back from node one.
    two.finish(&m, st).await.unwrap();
    assert!(!two.take(&m).await.unwrap() || !one.take(&m).await.unwrap());
    one.remove(&m).await.unwrap();

    // A message due in the future is not claimed.
    let f = qid(0x3002);
    one.store(&f, now, &envelope(&["y@far.test"]), b"Subject: f\r\n\r\n")
        .await
        .unwrap();
    let mut later = MessageState::new(1);
    later.rcpts[0].state = RcptState::Deferred;
    later.rcpts[0].next_attempt = now + 3600;
    one.finish(&f, later).await.unwrap();
    assert!(two.claim_due(10).await.unwrap().is_empty());
    one.remove(&f).await.unwrap();

    // A node restarted under its id (the old process gone with its passes) releases the
    // leases it held at once instead of waiting for them to run out.
    let r = qid(0x3003);
    one.store(&r, now, &envelope(&["z@far.test"]), b"Subject: r\r\n\r\n")
        .await
        .unwrap();
    assert!(!two.take(&r).await.unwrap());
    let one_again = PgStore::open(&pg_config(&cluster, &dir.path().join("one-again"), "one"))
        .await
        .unwrap();
    assert_eq!(one_again.claim_due(10).await.unwrap(), vec![r.clone()]);
    one_again.remove(&r).await.unwrap();

    // A database whose schema is newer than this build is refused, with the reason.
    sql(
        &cluster,
        "INSERT INTO moat_schema (version, applied) VALUES (999, 0)",
    )
    .await;
    let e = PgStore::open(&pg_config(&cluster, &dir.path().join("three"), "three"))
        .await
        .unwrap_err();
    assert!(e.contains("newer than this Moat"), "{e}");
}

/// `extra` for a node of the shared queue: far.test relays to `relay` (port SMTP).
fn node_extra(cluster: &Cluster, node: &str, ip: &str, relay: &str) -> String {
    format!(
        r#"[[domain]]
name = "far.test"
route = "relay"
relay = "{relay}:{SMTP}"

[queue]
store = "postgres"
retry_schedule_secs = [1]

[postgres]
url = "{}"
node_id = "{node}"
lease_secs = 10

[outbound]
connect_timeout_secs = 120

[admin]
listen = "{ip}:2580"
"#,
        cluster.url()
    )
}

/// One message from a new connection to `node`; the reply to its end of DATA.
fn send_one(node: &Moat, to: &str, subject: &str) -> common::Reply {
    let mut c = Client::connect(node.addr(SMTP));
    c.ehlo();
    c.send_mail(
        "alice@sender.test",
        &[to],
        &format!("Subject: {subject}\r\n\r\nhi\r\n"),
    )
}

/// Waits until the cluster's queue, asked through `node`, is empty.
fn wait_queue_empty(node: &Moat) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while node.queue_len() != 0 {
        assert!(Instant::now() < deadline, "queue never emptied");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Two Moat nodes share one queue. A message for the local domain is delivered by the node
/// that took it; a message whose delivery hangs when its node is killed (`kill -9`, lease
/// held) is delivered by the other node after the lease runs out.
#[test]
fn nodes_share_the_queue_and_a_dead_nodes_mail_moves_on() {
    let mut cluster = Cluster::start("127.0.27.2");
    // The relay target: first a server that accepts and never greets (the delivery hangs),
    // later a real Moat receiving far.test.
    let hang = TcpListener::bind(("127.0.27.13", SMTP)).unwrap();
    let mut a = Moat::start_with(
        "127.0.27.11",
        &node_extra(&cluster, "a", "127.0.27.11", "127.0.27.13"),
        "",
    );
    let b = Moat::start_with(
        "127.0.27.12",
        &node_extra(&cluster, "b", "127.0.27.12", "127.0.27.13"),
        "",
    );

    // Local delivery through node a.
    let r = send_one(&a, "bob@moat.test", "one");
    assert!(r.is("250 2.0.0"), "{}", r.text());
    a.wait_mailbox("bob", 1);
    // The queue is the cluster's: asked through node b, it is empty once a delivered.
    wait_queue_empty(&b);

    // Relayed mail through node a: its delivery hangs on the silent relay.
    let r = send_one(&a, "zed@far.test", "two");
    assert!(r.is("250 2.0.0"), "{}", r.text());
    let (mut held, _) = hang.accept().unwrap();
    assert_eq!(b.queue_len(), 1);
    a.kill9();
    // The real receiver takes the relay's place.
    let mut buf = [0u8; 16];
    held.set_read_timeout(Some(Duration::from_millis(10)))
        .unwrap();
    let _ = held.read(&mut buf);
    drop(held);
    drop(hang);
    let receiver = Moat::start_with(
        "127.0.27.13",
        "[[domain]]\nname = \"far.test\"\nroute = \"maildir\"\n",
        "",
    );
    // Node b claims it once node a's lease has run out (10 s) and delivers it.
    let deadline = Instant::now() + Duration::from_secs(60);
    let got = loop {
        let got = receiver.mailbox("zed");
        if !got.is_empty() {
            break got;
        }
        assert!(
            Instant::now() < deadline,
            "node b never delivered node a's message:\n{}",
            b.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(got.len(), 1);
    assert!(got[0].contains("Subject: two"), "{}", got[0]);
    wait_queue_empty(&b);
    assert!(
        b.log().contains("127.0.27.13"),
        "node b did not deliver it:\n{}",
        b.log()
    );

    // The cluster as `moat db status` and `moat status` see it: both nodes.
    let (ok, text) = common::moat_cli(&b, &["db", "status"]);
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!(
            "schema version {}",
            moat::queue::pg::SCHEMA_VERSION
        )) && text.contains("node a ")
            && text.contains("node b "),
        "{text}"
    );
    let (ok, text) = common::moat_cli(&b, &["status"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("queue store: PostgreSQL") && text.contains("node a "),
        "{text}"
    );

    // The database goes away: nothing is acknowledged that could not be stored (451 4.3.0
    // at the end of DATA), and the node goes on once the database is back.
    cluster.stop();
    let r = send_one(&b, "bob@moat.test", "three");
    assert!(r.is("451 4.3.0"), "{}", r.text());
    cluster.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = send_one(&b, "bob@moat.test", "four");
        if r.is("250 2.0.0") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never accepted again: {}",
            r.text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let got = b.wait_mailbox("bob", 1);
    assert_eq!(
        got.len(),
        1,
        "the message accepted after the restart was not delivered"
    );
    assert!(got[0].contains("Subject: four"), "{}", got[0]);
}

/// A sending node of a cluster (store = "postgres").
fn sts_node(
    cluster: &Cluster,
    node: &str,
    dns: std::net::SocketAddr,
    ca: &std::path::Path,
) -> String {
    format!(
        r#"[relay]
trusted_networks = ["127.0.0.0/8"]

[outbound]
port = {SMTP}
nameservers = ["{dns}"]
connect_timeout_secs = 3
dns_timeout_secs = 1

[queue]
store = "postgres"
retry_schedule_secs = [1]

[postgres]
url = "{}"
node_id = "{node}"
sync_interval_secs = 1

[mta_sts]
fetch_port = 8443
fetch_timeout_secs = 5
ca_file = "{}"
"#,
        cluster.url(),
        ca.display()
    )
}

/// The nodes share one MTA-STS cache: a policy node a fetched protects node b, which never
/// fetched it, when the TXT lookup and the policy host fail for b (what an attacker stripping
/// MTA-STS would do). Without the shared cache b would find no policy and deliver
/// opportunistically.
#[test]
fn nodes_share_mta_sts_policies() {
    use common::dns::{Rr, serve_dynamic};
    use common::https::PolicyServer;
    let dir = tempfile::tempdir().unwrap();
    let (ca, leaves) = common::make_certs(dir.path(), &["mta-sts.shared.test", "mx.shared.test"]);
    let dns = serve_dynamic(
        "127.0.27.21",
        "shared.test",
        &[
            Rr::Mx("shared.test", 10, "mx.shared.test"),
            Rr::A("mx.shared.test", [127, 0, 27, 23]),
            Rr::A("mta-sts.shared.test", [127, 0, 27, 22]),
            Rr::Txt("_mta-sts.shared.test", "v=STSv1; id=one;"),
        ],
    );
    let p = PolicyServer::start("127.0.27.22:8443", &leaves[0]);
    p.set_policy("version: STSv1\r\nmode: enforce\r\nmx: mx.shared.test\r\nmax_age: 86400\r\n");
    let receiver = Moat::start_with(
        "127.0.27.23",
        &common::maildir_receiver("shared.test", &leaves[1]),
        "",
    );
    let cluster = Cluster::start("127.0.27.20");
    let a = Moat::start_with("127.0.27.24", &sts_node(&cluster, "a", dns.addr, &ca), "");
    let b = Moat::start_with("127.0.27.25", &sts_node(&cluster, "b", dns.addr, &ca), "");
    let wait_mail = |n: usize| {
        common::wait_for(&format!("message {n}"), Duration::from_secs(20), || {
            (receiver.mailbox("k").len() >= n).then_some(())
        })
    };

    common::submit(&a, "alice@moat.test", &["k@shared.test"], "m1");
    wait_mail(1);
    assert_eq!(p.hits(), 1);
    assert!(
        a.log().contains("MTA-STS enforce (id one, fetched)"),
        "{}",
        a.log()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !b.log().contains("MTA-STS policy taken from the cluster") {
        assert!(
            Instant::now() < deadline,
            "node b never took the policy:\n{}\n--- node a:\n{}",
            b.log(),
            a.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // For node b the TXT lookup fails and the policy host is broken: the shared policy holds.
    dns.fail_txt();
    p.set_response(b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n".to_vec());
    common::submit(&b, "alice@moat.test", &["k@shared.test"], "m2");
    wait_mail(2);
    let log = b.log();
    let line = log
        .lines()
        .find(|l| l.contains("delivered") && l.contains("k@shared.test"))
        .unwrap_or_else(|| panic!("no delivery line:\n{log}"));
    assert!(
        line.contains("MTA-STS enforce (id one, cached; TXT lookup failed"),
        "{line}"
    );
    assert_eq!(p.hits(), 1, "node b fetched the policy itself");
}

/// TLS to the database (`sslmode=require`) is verified: chain to `[postgres] ca_file` (else the
/// system's CAs) and the host name. A test CA signs the server's certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_database_is_verified() {
    let certs = tempfile::tempdir().unwrap();
    let (ca, leaves) = common::make_certs(certs.path(), &["127.0.27.3", "127.0.27.99"]);
    let (cert, key) = &leaves[0];
    let cluster = Cluster::start_tls("127.0.27.3", cert, key);
    let dir = tempfile::tempdir().unwrap();
    let config = |ca_file: Option<&std::path::Path>| {
        let mut c = pg_config(&cluster, &dir.path().join("tls"), "tls");
        c.postgres.url = format!("{}?sslmode=require", cluster.url());
        c.postgres.ca_file = ca_file.map(|p| p.to_path_buf());
        c
    };

    // Trusted: the store works, over TLS.
    let (pool, _) = moat::queue::pg::pool(&config(Some(&ca))).unwrap();
    moat::queue::pg::migrate(&pool).await.unwrap();
    let client = pool.get().await.unwrap();
    let row = client
        .query_one(
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "the connection is not TLS");
    let version: String = row.get(1);
    assert!(version.starts_with("TLSv1."), "{version}");

    // Not trusted (system CAs only): refused, with the reason.
    let (pool, _) = moat::queue::pg::pool(&config(None)).unwrap();
    let e = moat::queue::pg::migrate(&pool).await.unwrap_err();
    assert!(e.contains("invalid peer certificate: UnknownIssuer"), "{e}");

    // Trusted CA, wrong name: refused.
    let (cert2, key2) = &leaves[1];
    let other = Cluster::start_tls("127.0.27.4", cert2, key2);
    let mut c = config(Some(&ca));
    c.postgres.url = format!("{}?sslmode=require", other.url());
    let (pool, _) = moat::queue::pg::pool(&c).unwrap();
    let e = moat::queue::pg::migrate(&pool).await.unwrap_err();
    assert!(
        e.contains("certificate not valid for name \"127.0.27.4\""),
        "{e}"
    );
}
