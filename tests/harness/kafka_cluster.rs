//! An Apache Kafka cluster of a test's own, for tests that kill, stall or restart brokers.
//!
//! It is `scripts/kafka/start.sh` (the same script the suite's shared broker comes from) run
//! as a daemon into a folder of the test's: one KRaft node (`broker,controller`), or one
//! controller and N brokers with replication factor 3 and `min.insync.replicas=2` when N >= 3.
//! Each node's folder has a `run.sh` that starts it again on the same port and data, so what a
//! broker acknowledged survives its restart. The cluster is stopped (and its watchdog with it)
//! when the value is dropped; the script's watchdog stops it anyway after an hour.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

/// Node id of the controller in a cluster of separate brokers (what start.sh gives it).
pub const CONTROLLER: i32 = 100;

pub struct KafkaCluster {
    dir: PathBuf,
    bootstrap: String,
    brokers: Vec<i32>,
    controllers: Vec<i32>,
    ports: BTreeMap<i32, u16>,
    /// Nodes this test started again (its children, reaped when killed).
    restarted: Mutex<BTreeMap<i32, Child>>,
}

fn start_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/kafka/start.sh")
}

impl KafkaCluster {
    /// One node, with three partitions by default, that a test may stop (SIGSTOP) for a while:
    /// the node is its own controller, and stalled past `broker.session.timeout.ms` (9 s by
    /// default) it fenced itself on waking and once in three runs stayed fenced for over 90 s
    /// (every partition without a leader). Its session is a minute here; a broker stalled past
    /// its session, among three, is a fault of the fault suite.
    pub fn start_stoppable(dir: &Path) -> Self {
        Self::start(dir, 1, 3, &["broker.session.timeout.ms=60000"])
    }

    /// Starts `brokers` broker nodes (one combined node when 1) with `partitions` as the
    /// default partition count and the extra `server.properties` lines in `props`, into
    /// `dir/kafka`, and waits until every broker acknowledged an `acks=all` produce.
    pub fn start(dir: &Path, brokers: usize, partitions: u32, props: &[&str]) -> Self {
        let kdir = dir.join("kafka");
        let mut cmd = Command::new("bash");
        cmd.arg(start_script())
            .args(["-n", &brokers.to_string()])
            .args(["--partitions", &partitions.to_string()])
            .args(["--max-lifetime", "3000", "--daemon", "--dir"])
            .arg(&kdir);
        for p in props {
            cmd.args(["--prop", p]);
        }
        if let Ok(libs) = std::env::var("SAFECLOCK_KAFKA_LIBS") {
            cmd.env("KAFKA_LIBS", libs);
        }
        let out = cmd.stderr(Stdio::inherit()).output().expect("bash runs");
        assert!(
            out.status.success(),
            "scripts/kafka/start.sh failed ({}); logs under {}",
            out.status,
            kdir.display()
        );
        let env = std::fs::read_to_string(kdir.join("cluster.env")).unwrap();
        let var = |name: &str| -> String {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .unwrap_or_default()
                .trim_matches('"')
                .to_string()
        };
        let ids = |list: String| -> Vec<i32> {
            list.split_whitespace()
                .map(|s| s.parse().unwrap())
                .collect()
        };
        let brokers = ids(var("BROKERS"));
        let ports = brokers
            .iter()
            .map(|id| (*id, var(&format!("NODE_{id}_PORT")).parse().unwrap()))
            .collect();
        Self {
            bootstrap: var("BOOTSTRAP"),
            controllers: ids(var("CONTROLLERS")),
            brokers,
            ports,
            dir: kdir,
            restarted: Mutex::default(),
        }
    }

    /// `bootstrap.servers` for clients: every broker.
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    pub fn brokers(&self) -> &[i32] {
        &self.brokers
    }

    /// The controller nodes (the combined node of a one-node cluster).
    pub fn controllers(&self) -> &[i32] {
        &self.controllers
    }

    fn node_dir(&self, id: i32) -> PathBuf {
        self.dir.join(format!("node-{id}"))
    }

    /// The node's JVM, if it runs.
    pub fn pid(&self, id: i32) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.node_dir(id).join("pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let state = stat.rsplit(") ").next()?.chars().next()?;
        let ours = String::from_utf8_lossy(&cmdline)
            .contains(self.node_dir(id).to_string_lossy().as_ref());
        (ours && state != 'Z').then_some(pid)
    }

    /// SIGKILL of the node; returns once it is gone.
    pub fn kill(&self, id: i32) {
        self.signal_and_wait(id, "KILL", Duration::from_secs(10));
    }

    /// SIGTERM (a controlled shutdown); returns once it is gone (SIGKILL after 60 s).
    pub fn terminate(&self, id: i32) {
        if !self.signal_and_wait(id, "TERM", Duration::from_secs(60)) {
            self.kill(id);
        }
    }

    fn signal_and_wait(&self, id: i32, signal: &str, timeout: Duration) -> bool {
        let Some(pid) = self.pid(id) else { return true };
        super::signal(pid, "CONT");
        super::signal(pid, signal);
        if let Some(mut child) = self.restarted.lock().unwrap().remove(&id) {
            // Our child: reap it (bounded: a SIGTERMed JVM may take a while).
            let deadline = Instant::now() + timeout;
            while Instant::now() < deadline {
                if child.try_wait().ok().flatten().is_some() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            self.restarted.lock().unwrap().insert(id, child);
            return false;
        }
        let deadline = Instant::now() + timeout;
        while self.pid(id).is_some() {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        true
    }

    /// Starts a stopped node again (same port, same data); for a broker, returns once its port
    /// accepts connections (it may still be catching up with the controller and its replicas).
    pub fn start_node(&self, id: i32) {
        assert!(self.pid(id).is_none(), "node {id} still runs");
        let child = Command::new(self.node_dir(id).join("run.sh"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run.sh starts");
        self.restarted.lock().unwrap().insert(id, child);
        if let Some(port) = self.ports.get(&id) {
            let deadline = Instant::now() + Duration::from_secs(60);
            while std::net::TcpStream::connect(("127.0.0.1", *port)).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "broker {id} did not listen again within 60 s (see {})",
                    self.node_dir(id).join("logs/server.log").display()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// SIGSTOP: the node keeps its connections and answers nothing (a stalled disk, a long GC
    /// pause, a partition) until [`KafkaCluster::resume`].
    pub fn pause(&self, id: i32) {
        if let Some(pid) = self.pid(id) {
            super::signal(pid, "STOP");
        }
    }

    pub fn resume(&self, id: i32) {
        if let Some(pid) = self.pid(id) {
            super::signal(pid, "CONT");
        }
    }

    /// The broker that leads most partitions of `topics` (the busiest), from the cluster's
    /// metadata; `None` when no leader is known.
    pub fn busiest_leader(&self, topics: &[&str]) -> Option<i32> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .create()
            .ok()?;
        let mut led: BTreeMap<i32, usize> = BTreeMap::new();
        for topic in topics {
            let Ok(md) = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)) else {
                continue;
            };
            for t in md.topics() {
                for p in t.partitions() {
                    if p.leader() >= 0 {
                        *led.entry(p.leader()).or_default() += 1;
                    }
                }
            }
        }
        led.into_iter().max_by_key(|(_, n)| *n).map(|(id, _)| id)
    }

    /// Where the nodes' logs are (`node-ID/logs/server.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for KafkaCluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(start_script())
            .arg("--stop")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        for (_, mut child) in std::mem::take(&mut *self.restarted.lock().unwrap()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
