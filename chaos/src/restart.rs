//! Case 3: restart a service mid-stream while messages flow deposit → outbox →
//! sweeper → broker → pump → inbox-protected handler, all in this process; then
//! every message must have been handled exactly once, with nothing parked.

use std::time::{Duration, Instant};

use brighter_core::Dispatcher;
use brighter_core::pipeline::OnDuplicate;
use brighter_outbox_postgres::{PgOutbox, RunningSweeper};
use tokio::process::{Child, Command as Process};

use crate::Outcome;
use crate::rig::{Res, Rig, Transport, deposit, kill9, ping_message, wait_until};

/// How long Postgres and Kafka stay down (a RabbitMQ node restart takes about
/// as long by itself).
const DOWN: Duration = Duration::from_secs(8);

/// A service the case restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Service {
    Rabbit,
    Kafka,
    Postgres,
}

impl Service {
    pub(crate) fn parse(name: &str) -> Res<Service> {
        match name {
            "rabbitmq" => Ok(Service::Rabbit),
            "kafka" => Ok(Service::Kafka),
            "postgres" => Ok(Service::Postgres),
            other => Err(format!("unknown service '{other}' (rabbitmq, kafka or postgres)").into()),
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Service::Rabbit => "rabbitmq",
            Service::Kafka => "kafka",
            Service::Postgres => "postgres",
        }
    }
}

/// Runs a shell command; fails with its output when it fails.
async fn shell(command: &str) -> Res<()> {
    let output = Process::new("bash").args(["-c", command]).output().await?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{command}` failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
        .into())
    }
}

async fn port_open(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
}

/// A Kafka broker of the case's own on durable storage, restarted under the
/// running sweeper and pump: Apache Kafka (scripts/kafka.sh), or tansu on
/// SQLite storage where tansu is the test broker.
pub(crate) enum DurableKafka {
    Apache { port: u16, data: String },
    Tansu(Tansu),
}

impl DurableKafka {
    pub(crate) async fn start(port: u16) -> Res<DurableKafka> {
        if crate::rig::on_tansu() {
            return Ok(DurableKafka::Tansu(Tansu::start(port).await?));
        }
        if port_open(port).await {
            return Err(format!("something already listens on 127.0.0.1:{port}").into());
        }
        std::fs::create_dir_all("target/chaos")?;
        let data = std::fs::canonicalize("target/chaos")?
            .join(format!("kafka-{port}-{}", uuid::Uuid::now_v7().simple()))
            .to_string_lossy()
            .into_owned();
        let broker = DurableKafka::Apache { port, data };
        broker.kafka_sh("start").await?;
        Ok(broker)
    }

    async fn kafka_sh(&self, command: &str) -> Res<()> {
        if let DurableKafka::Apache { port, data } = self {
            shell(&format!(
                "bash scripts/kafka.sh {command} --port {port} --data '{data}' >/dev/null"
            ))
            .await?;
        }
        Ok(())
    }

    pub(crate) fn address(&self) -> String {
        match self {
            DurableKafka::Apache { port, .. } => format!("127.0.0.1:{port}"),
            DurableKafka::Tansu(tansu) => tansu.address(),
        }
    }

    /// A clean stop, down for [`DOWN`], and a start on the same storage.
    async fn restart(&mut self) -> Res<()> {
        match self {
            DurableKafka::Tansu(tansu) => tansu.restart().await,
            DurableKafka::Apache { .. } => {
                self.kafka_sh("stop").await?;
                tokio::time::sleep(DOWN).await;
                self.kafka_sh("start").await
            }
        }
    }

    pub(crate) async fn stop(self) {
        match self {
            DurableKafka::Tansu(tansu) => tansu.stop().await,
            DurableKafka::Apache { ref data, .. } => {
                let _ = self.kafka_sh("stop").await;
                let _ = std::fs::remove_dir_all(data);
            }
        }
    }
}

/// tansu on SQLite storage (the fallback broker).
pub(crate) struct Tansu {
    child: Child,
    port: u16,
    storage: String,
}

impl Tansu {
    fn binary() -> String {
        std::env::var("TANSU").unwrap_or_else(|_| {
            let home = std::env::var("HOME").unwrap_or_default();
            let installed = format!("{home}/.cargo/bin/tansu");
            if std::path::Path::new(&installed).exists() {
                installed
            } else {
                "tansu".into()
            }
        })
    }

    fn spawn(port: u16, storage: &str) -> Res<Child> {
        let address = format!("tcp://127.0.0.1:{port}");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(format!("target/chaos/tansu-{port}.log"))?;
        Ok(Process::new(Self::binary())
            .args([
                "broker",
                "--listener-url",
                &address,
                "--advertised-listener-url",
                &address,
                "--storage-engine",
                storage,
            ])
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()?)
    }

    /// Starts tansu on `port` with a new SQLite file under `target/chaos`.
    pub(crate) async fn start(port: u16) -> Res<Tansu> {
        if port_open(port).await {
            return Err(format!("something already listens on 127.0.0.1:{port}").into());
        }
        std::fs::create_dir_all("target/chaos")?;
        let storage = format!(
            "sqlite://target/chaos/tansu-{}.db",
            uuid::Uuid::now_v7().simple()
        );
        let child = Self::spawn(port, &storage)?;
        let tansu = Tansu {
            child,
            port,
            storage,
        };
        tansu.wait_up().await?;
        Ok(tansu)
    }

    async fn wait_up(&self) -> Res<()> {
        if wait_until(Duration::from_secs(30), || port_open(self.port)).await {
            Ok(())
        } else {
            Err(format!("tansu did not listen on {} within 30 s", self.port).into())
        }
    }

    pub(crate) fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops it (SIGTERM, SIGKILL after 10 s) and starts it on the same storage.
    async fn restart(&mut self) -> Res<()> {
        if let Some(pid) = self.child.id() {
            shell(&format!("kill -TERM {pid}")).await?;
        }
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            kill9(&mut self.child).await?;
        }
        tokio::time::sleep(DOWN).await;
        self.child = Self::spawn(self.port, &self.storage)?;
        self.wait_up().await
    }

    pub(crate) async fn stop(mut self) {
        let _ = kill9(&mut self.child).await;
        if let Some(file) = self.storage.strip_prefix("sqlite://") {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{file}{suffix}"));
            }
        }
    }
}

/// Restarts `service`; how long it was down.
async fn restart_service(service: Service, kafka: Option<&mut DurableKafka>) -> Res<Duration> {
    let started = Instant::now();
    match (service, kafka) {
        (Service::Kafka, Some(kafka)) => kafka.restart().await?,
        (Service::Rabbit, _) => {
            shell("rabbitmqctl stop >/dev/null && rabbitmq-server -detached >/dev/null 2>&1")
                .await?;
            if !wait_until(Duration::from_secs(120), || port_open(5672)).await {
                return Err("RabbitMQ did not come back within 120 s".into());
            }
            shell("rabbitmqctl await_startup >/dev/null").await?;
        }
        (Service::Postgres, _) => {
            // Down for longer than the pools' acquire timeout (5 s), so callers
            // see the outage rather than wait it out.
            let cluster =
                "--skip-systemctl-redirect \"$(ls /etc/postgresql | sort -V | tail -n 1)\" main";
            shell(&format!(
                "pg_ctlcluster {cluster} stop -m fast && sleep {} && pg_ctlcluster {cluster} start",
                DOWN.as_secs()
            ))
            .await?;
        }
        (Service::Kafka, None) => return Err("no Kafka broker of the case's own to restart".into()),
    }
    Ok(started.elapsed())
}

/// The whole flow in this process: the sweeper and the pump on `rig`.
pub(crate) struct Flow {
    pub(crate) outbox: PgOutbox,
    pub(crate) sweeper: RunningSweeper,
    pub(crate) dispatcher: Dispatcher,
}

impl Flow {
    /// Starts the sweeper (sending rows older than `min_age`) and, unless
    /// `consume` is false, the pump.
    pub(crate) async fn start(rig: &Rig, consume: bool, min_age: Duration) -> Res<Flow> {
        rig.prepare().await?;
        rig.create_effects().await?;
        let outbox = rig.outbox().await?;
        let sweeper = rig.start_sweeper(outbox.clone(), min_age).await?;
        let dispatcher = Dispatcher::builder(rig.consumer(OnDuplicate::Skip).await?)
            .subscription(rig.subscription()?.performers(2))
            .build()?;
        if consume {
            dispatcher.start().await?;
        }
        Ok(Flow {
            outbox,
            sweeper,
            dispatcher,
        })
    }

    pub(crate) async fn stop(self) {
        self.dispatcher.shutdown().await;
        self.sweeper.stop().await;
    }
}

/// Case 3 for `service`: `total` messages deposited at about 400 a second, the
/// service restarted once a quarter of them were handled.
pub(crate) async fn restart(service: Service, total: u64) -> Res<Outcome> {
    let transport = if service == Service::Kafka {
        Transport::Kafka
    } else {
        Transport::Rabbit
    };
    let mut rig = Rig::new(transport, "restart").await?;
    let mut kafka = None;
    if service == Service::Kafka {
        let broker = DurableKafka::start(crate::rig::DURABLE_KAFKA_PORT).await?;
        rig.brokers = broker.address();
        kafka = Some(broker);
    }
    // The restart hits both sides, the sweeper and the running pump. Only on
    // tansu does the pump start once the broker is back: tansu 0.6 on SQLite
    // storage panics and exits (tansu-storage service.rs:337, `unreachable!`
    // in update_group) on the first offset commit of a group that existed
    // before it restarted.
    let consume_during = !(service == Service::Kafka && crate::rig::on_tansu());
    let flow = Flow::start(&rig, consume_during, Duration::ZERO).await?;
    let depositing = {
        let (rig, outbox) = (rig.clone(), flow.outbox.clone());
        tokio::spawn(async move {
            let mut retries = 0;
            let mut seq = 0;
            while seq < total {
                let batch: Vec<_> = (seq..(seq + 20).min(total))
                    .map(|i| ping_message(&rig.topic, i))
                    .collect();
                retries += deposit(&outbox, &rig.pool, &rig.schema, &batch).await?;
                seq += batch.len() as u64;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Res::Ok(retries)
        })
    };
    let flowing = wait_until(Duration::from_secs(120), || async {
        if consume_during {
            rig.effect_rows().await >= total / 4
        } else {
            flow.sweeper.stats().sent() >= total / 4
        }
    })
    .await;
    if !flowing {
        return Err("a quarter of the messages were not through within 120 s".into());
    }
    let away = restart_service(service, kafka.as_mut()).await?;
    let back = Instant::now();
    let retries = depositing.await??;
    if !consume_during {
        flow.dispatcher.start().await?;
    }
    let handled = wait_until(Duration::from_secs(300), || async {
        rig.handled().await >= total
    })
    .await;
    let caught_up = back.elapsed();
    // Sends that timed out during the outage may have reached the broker all
    // the same: the sweeper sends them again (the inbox drops the copies) and
    // then marks them, so wait for the outbox to drain too.
    let drained = wait_until(Duration::from_secs(120), || async {
        brighter_core::Outbox::outstanding_count(&flow.outbox)
            .await
            .ok()
            == Some(0)
    })
    .await;
    let drained_after = back.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (rows, distinct) = rig.effects().await?;
    let outstanding = brighter_core::Outbox::outstanding_count(&flow.outbox).await?;
    let health = flow.dispatcher.health().pop();
    let (parked, restarts, not_acked) = health
        .map(|h| (h.dead_lettered + h.invalid, h.restarts, h.not_acked))
        .unwrap_or_default();
    let resend_failures = flow.sweeper.stats().failed();
    flow.stop().await;
    if let Some(kafka) = kafka {
        kafka.stop().await;
    }
    rig.drop_schema().await;
    Ok(Outcome::new(
        handled
            && drained
            && rows as u64 == total
            && distinct as u64 == total
            && parked == 0
            && outstanding == 0,
        format!(
            "{total} deposited, {rows} effect rows for {distinct} messages, {parked} parked, {outstanding} left in the outbox; \
             down {:.1} s, all handled {:.1} s and outbox drained {:.1} s after it was back; {retries} deposit retries, \
             {resend_failures} failed sends, {not_acked} left for redelivery, {restarts} pump restarts",
            away.as_secs_f64(),
            caught_up.as_secs_f64(),
            drained_after.as_secs_f64()
        ),
    ))
}
