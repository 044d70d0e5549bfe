//! A seeded fault campaign: one answer per key, checked on a recorded history.
//!
//! The system under test is N instances (separate processes) of a payments-like create
//! (`POST /payments`, `Idempotency-Key`, a JSON body) under `IdempotencyLayer`, and a create
//! keyed by a JSON field (`POST /clients`, `id`) under `HttpCoalesceLayer`, on one real
//! store: `PostgresStore`, `RedisStore` on a Redis with an append-only file
//! (`appendfsync always`) or without persistence, or a Redis Cluster of three masters. The
//! handler writes its effect to PostgreSQL fenced by the `FencingToken` and prints every
//! run. Many clients retry like real ones over a small, moving key space (high contention),
//! some reusing a key with another body. Faults come on a schedule drawn from the seed:
//! instances killed (`SIGKILL`) and restarted, stopped (`SIGSTOP`) past their lease, the
//! store crashed and restarted, its connections killed, and each instance's store
//! connection (through a TCP proxy the campaign runs) slowed, blackholed or reset. Then
//! the faults stop, every key that got a `2xx` is asked once more, and the checker
//! reads the history (see `check.rs` for the invariants).
//!
//!     cargo run --release --example campaign --features postgres,redis -- --seconds 60 --seed 7
//!     ... -- --store postgres --minutes 30 --seed 11      # a long run, one store
//!     ... -- --store redis --no-faults                     # the control run
//!
//! The same seed gives the same fault schedule (printed). Exit status 1 on a violation;
//! each violation's key history is written under `--out`.

#[path = "../../tests/support/proxy.rs"]
mod proxy;

mod check;
mod instance;
mod servers;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proxy::Proxy;
use servers::{Cluster, Postgres, Redis};

type Error = tower_coalesce::BoxError;

#[derive(clap::Parser, Debug)]
#[command(name = "campaign")]
struct Args {
    #[command(subcommand)]
    instance: Option<Sub>,
    /// `postgres`, `postgres-atomic`, `redis-aof`, `redis` (no persistence), `cluster`, or
    /// `all`.
    #[arg(long, default_value = "all")]
    store: String,
    /// Seconds of workload (and faults) per store.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Minutes instead of seconds, for a long run.
    #[arg(long)]
    minutes: Option<u64>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Instances of the app, each a process.
    #[arg(long, default_value_t = 3)]
    instances: usize,
    #[arg(long = "lease-ms", default_value_t = 1000)]
    lease_ms: u64,
    /// Mean time between two faults.
    #[arg(long = "fault-every-ms", default_value_t = 3000)]
    fault_every_ms: u64,
    /// A new key every this many milliseconds ...
    #[arg(long = "key-every-ms", default_value_t = 25)]
    key_every_ms: u64,
    /// ... and this many keys in play at once (the clients pick among them).
    #[arg(long = "keys-in-play", default_value_t = 32)]
    keys_in_play: u64,
    /// How long a handler works before it writes its effect (a payment provider's call).
    #[arg(long = "work-ms", default_value_t = 50)]
    work_ms: u64,
    /// The control run: the same workload, no faults.
    #[arg(long)]
    no_faults: bool,
    /// Where violations' histories are written.
    #[arg(long, default_value = "target/campaign")]
    out: PathBuf,
}

#[derive(clap::Subcommand, Debug)]
enum Sub {
    /// Run as one instance of the app (the campaign starts these).
    #[command(hide = true)]
    Instance(instance::InstanceArgs),
}

fn main() -> Result<(), Error> {
    let args = <Args as clap::Parser>::parse();
    if let Some(Sub::Instance(instance)) = args.instance {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        return runtime.block_on(instance::run(instance));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(campaign(args))
}

/// The store modes a campaign runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Postgres,
    /// `PostgresStore::atomic()`: the effects in the flight's own transaction.
    PostgresAtomic,
    RedisAof,
    Redis,
    Cluster,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Postgres => "postgres",
            Mode::PostgresAtomic => "postgres-atomic",
            Mode::RedisAof => "redis-aof",
            Mode::Redis => "redis",
            Mode::Cluster => "cluster",
        }
    }

    /// Whether what the store answered survives its crash.
    pub fn durable(self) -> bool {
        self != Mode::Redis
    }

    /// Whether the store is PostgreSQL (atomic or not).
    fn postgres(self) -> bool {
        matches!(self, Mode::Postgres | Mode::PostgresAtomic)
    }
}

async fn campaign(args: Args) -> Result<(), Error> {
    let modes = match args.store.as_str() {
        "all" => vec![
            Mode::Postgres,
            Mode::PostgresAtomic,
            Mode::RedisAof,
            Mode::Redis,
            Mode::Cluster,
        ],
        "postgres" => vec![Mode::Postgres],
        "postgres-atomic" => vec![Mode::PostgresAtomic],
        "redis-aof" => vec![Mode::RedisAof],
        "redis" => vec![Mode::Redis],
        "cluster" => vec![Mode::Cluster],
        other => return Err(format!("unknown store {other}").into()),
    };
    let seconds = args.minutes.map_or(args.seconds, |m| m * 60);
    std::fs::create_dir_all(&args.out)?;
    let mut reports = Vec::new();
    for mode in modes {
        let report = run_mode(&args, mode, Duration::from_secs(seconds)).await?;
        reports.push(report);
    }
    println!();
    println!(
        "seed {}, {} s per store, {} clients, {} instances, lease {} ms, a fault every ~{} ms{}",
        args.seed,
        seconds,
        args.clients,
        args.instances,
        args.lease_ms,
        args.fault_every_ms,
        if args.no_faults {
            " (control: no faults)"
        } else {
            ""
        }
    );
    check::print_table(&reports);
    if reports.iter().any(check::Report::failed) {
        eprintln!("violations found: histories in {}", args.out.display());
        std::process::exit(1);
    }
    Ok(())
}

/// Milliseconds since the campaign of one store started: every event's time.
#[derive(Clone, Copy)]
pub struct Clock(Instant);

impl Clock {
    pub fn now(&self) -> f64 {
        self.0.elapsed().as_secs_f64() * 1000.0
    }
}

/// A small seeded generator (SplitMix64): the fault schedule and the clients' choices.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// `true` with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

/// What the checker reads: every attempt of every request, every handler run, every fault.
#[derive(Default)]
pub struct History {
    pub attempts: Vec<check::Attempt>,
    pub runs: Vec<check::Run>,
    pub faults: Vec<check::FaultWindow>,
    /// The answers of the last pass, after the faults: key -> the answer (or error).
    pub finals: HashMap<String, check::Outcome>,
    /// Effective writes per key, and the run of the last, from the effects table.
    pub writes: HashMap<String, (i64, String)>,
    pub panics: Vec<String>,
    /// Instances that answered no fresh request after the faults healed (by index).
    pub unrecovered: Vec<usize>,
}

/// The system under test: the store's servers, the instances and their proxies. Each part
/// has a lock of its own, so that a fault that waits (an instance restarting until its
/// store answers) never holds up another fault (the proxy fault that keeps it from
/// answering, which would otherwise never end).
struct Sut {
    mode: Mode,
    postgres: Postgres,
    redis: Option<Mutex<Redis>>,
    cluster: Option<Mutex<Cluster>>,
    /// Held by a store restart: two at once would stop a stopped server.
    restarting: Mutex<()>,
    /// Set through `&self`: no lock.
    proxies: Vec<Proxy>,
    instances: Vec<tokio::sync::Mutex<InstanceProc>>,
}

struct InstanceProc {
    args: Vec<String>,
    child: Option<Child>,
    port: u16,
    stderr: PathBuf,
}

async fn run_mode(args: &Args, mode: Mode, duration: Duration) -> Result<check::Report, Error> {
    println!(
        "== {}: starting the store and {} instances",
        mode.name(),
        args.instances
    );
    let dir = tempfile::tempdir()?;
    let postgres = tokio::task::spawn_blocking(Postgres::start).await??;
    let (redis, cluster) = match mode {
        Mode::Postgres | Mode::PostgresAtomic => (None, None),
        Mode::RedisAof | Mode::Redis => {
            let path = dir.path().to_owned();
            let aof = mode == Mode::RedisAof;
            (
                Some(tokio::task::spawn_blocking(move || Redis::start(&path, aof)).await??),
                None,
            )
        }
        Mode::Cluster => {
            let path = dir.path().to_owned();
            (
                None,
                Some(tokio::task::spawn_blocking(move || Cluster::start(&path)).await??),
            )
        }
    };
    let effects_table = "effects";
    let store_table = "campaign_store";
    let pool = connect_postgres(&postgres.url()).await?;
    sqlx::query(&format!(
        "CREATE TABLE {effects_table} (key text PRIMARY KEY, body text NOT NULL,
         fence bigint NOT NULL, run text NOT NULL, writes int NOT NULL)"
    ))
    .execute(&pool)
    .await?;
    if mode.postgres() {
        let store = tower_coalesce::postgres::PostgresStore::builder()
            .table(store_table)
            .build(pool.clone())
            .await?;
        store.migrate().await?;
    }

    let upstream = match (mode, &redis) {
        (Mode::Postgres | Mode::PostgresAtomic, _) => Some(postgres.port),
        (_, Some(redis)) => Some(redis.port),
        _ => None,
    };
    let mut proxies = Vec::new();
    let mut instances = Vec::new();
    let exe = std::env::current_exe()?;
    for i in 0..args.instances {
        let store_url = match (mode, upstream) {
            (Mode::Cluster, _) => cluster.as_ref().unwrap().urls(),
            (_, Some(port)) => {
                let proxy = Proxy::start(([127, 0, 0, 1], port).into()).await;
                let url = match mode {
                    Mode::Postgres | Mode::PostgresAtomic => {
                        format!("postgres://postgres@{}/postgres", proxy.addr)
                    }
                    _ => format!("redis://{}", proxy.addr),
                };
                proxies.push(proxy);
                url
            }
            _ => unreachable!("a single store has a port"),
        };
        let port = servers::free_port();
        let store = match mode {
            Mode::Postgres => "postgres",
            Mode::PostgresAtomic => "postgres-atomic",
            Mode::RedisAof | Mode::Redis => "redis",
            Mode::Cluster => "cluster",
        };
        let instance_args = vec![
            "instance".to_owned(),
            format!("--name=i{i}"),
            format!("--port={port}"),
            format!("--store={store}"),
            format!("--store-url={store_url}"),
            format!("--effects-url={}", postgres.url()),
            format!("--effects-table={effects_table}"),
            format!("--store-table={store_table}"),
            "--redis-prefix=campaign:".to_owned(),
            format!("--lease-ms={}", args.lease_ms),
            "--timeout-ms=500".to_owned(),
            format!("--work-ms={}", args.work_ms),
        ];
        instances.push(InstanceProc {
            args: instance_args,
            child: None,
            port,
            stderr: dir.path().join(format!("i{i}.stderr")),
        });
    }
    let clock = Clock(Instant::now());
    let history = Arc::new(Mutex::new(History::default()));
    for (i, instance) in instances.iter_mut().enumerate() {
        start_instance(instance, i, &exe, clock, &history)?;
    }
    let addrs: Vec<std::net::SocketAddr> = instances
        .iter()
        .map(|i| ([127, 0, 0, 1], i.port).into())
        .collect();
    let sut = Arc::new(Sut {
        mode,
        postgres,
        redis: redis.map(Mutex::new),
        cluster: cluster.map(Mutex::new),
        restarting: Mutex::new(()),
        proxies,
        instances: instances.into_iter().map(tokio::sync::Mutex::new).collect(),
    });

    let schedule = if args.no_faults {
        Vec::new()
    } else {
        plan(args, mode, duration)
    };
    println!(
        "   {} faults planned from seed {}: {}",
        schedule.len(),
        args.seed,
        schedule
            .iter()
            .take(6)
            .map(|p| format!("{:.1}s {:?}", p.at_ms as f64 / 1000.0, p.fault))
            .collect::<Vec<_>>()
            .join(", ")
            + if schedule.len() > 6 { ", ..." } else { "" }
    );
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    let faults = tokio::spawn(inject(
        schedule,
        sut.clone(),
        exe.clone(),
        clock,
        history.clone(),
    ));
    let workload = Workload {
        client: client.clone(),
        addrs: addrs.clone(),
        mode,
        seed: args.seed,
        clock,
        until: clock.now() + duration.as_secs_f64() * 1000.0,
        key_every_ms: args.key_every_ms as f64,
        keys_in_play: args.keys_in_play,
        history: history.clone(),
    };
    let clients: Vec<_> = (0..args.clients)
        .map(|c| tokio::spawn(workload.clone().client(c as u64)))
        .collect();
    for c in clients {
        c.await?;
    }
    faults.await??;

    // The faults are over: everything healed and up. Each key that ever got a 2xx is asked
    // once more, with the body that got it, on a random instance.
    println!("   workload done; healing and asking every answered key again");
    heal(&sut, &exe, clock, &history).await?;
    tokio::time::sleep(Duration::from_millis(2 * args.lease_ms)).await;
    // Every instance must serve again once its store is back: one that stays cut off from
    // it (its client wedged) answers every request with a 503 forever, which the checks
    // below would only see as lost answers. The final pass then asks the others.
    let unrecovered = recovered(&workload).await;
    history.lock().unwrap().unrecovered = unrecovered;
    // Keys with an effect but no 2xx seen (their answer was lost with a killed instance,
    // or a timed-out client) are asked too, with the body the effect was written for.
    let effect_bodies: Vec<(String, String)> =
        sqlx::query_as(&format!("SELECT key, body FROM {effects_table}"))
            .fetch_all(&connect_postgres(&sut.postgres.url()).await?)
            .await?;
    final_pass(&workload, effect_bodies).await;

    let writes: Vec<(String, i32, String)> =
        sqlx::query_as(&format!("SELECT key, writes, run FROM {effects_table}"))
            .fetch_all(&connect_postgres(&sut.postgres.url()).await?)
            .await?;
    {
        let mut h = history.lock().unwrap();
        h.writes = writes
            .into_iter()
            .map(|(key, writes, run)| (key, (writes as i64, run)))
            .collect();
    }
    let unrecovered = history.lock().unwrap().unrecovered.clone();
    for (i, instance) in sut.instances.iter().enumerate() {
        let mut instance = instance.lock().await;
        stop_instance(&mut instance);
        let stderr = std::fs::read_to_string(&instance.stderr).unwrap_or_default();
        let replaced = stderr
            .lines()
            .filter(|l| l.contains("stopped answering") && l.contains("replaced it"))
            .count();
        if replaced > 0 {
            println!("   instance {i} replaced its store connection {replaced} times");
        }
        if unrecovered.contains(&i) {
            let kept = args
                .out
                .join(format!("{}-seed{}-i{i}.stderr", mode.name(), args.seed));
            std::fs::create_dir_all(&args.out)?;
            std::fs::write(&kept, &stderr)?;
        }
        for line in stderr.lines().filter(|l| l.contains("panicked")) {
            history.lock().unwrap().panics.push(line.to_owned());
        }
    }
    let history = std::mem::take(&mut *history.lock().unwrap());
    let report = check::check(mode, &history, args.lease_ms as f64, &args.out, args.seed)?;
    println!("{}", report.summary());
    Ok(report)
}

async fn connect_postgres(url: &str) -> Result<sqlx::PgPool, Error> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(2))
            .connect(url)
            .await
        {
            Ok(pool) => return Ok(pool),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(error) => return Err(error.into()),
        }
    }
}

/// Starts (or restarts) instance `i` and waits until it listens; its run lines go to the
/// history as they come. An instance that can't reach its store at startup exits (as it
/// would in production): it is started again, as a supervisor would, for up to 30 s.
fn start_instance(
    instance: &mut InstanceProc,
    i: usize,
    exe: &std::path::Path,
    clock: Clock,
    history: &Arc<Mutex<History>>,
) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&instance.stderr)?;
        let mut child = Command::new(exe)
            .args(&instance.args)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()?;
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (ready, listening) = std::sync::mpsc::channel();
        let history = history.clone();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if line.starts_with("listening") {
                    let _ = ready.send(());
                    continue;
                }
                if let Some(run) = check::Run::parse(&line, i, clock.now()) {
                    history.lock().unwrap().runs.push(run);
                }
            }
        });
        let left = deadline.saturating_duration_since(Instant::now());
        match listening.recv_timeout(left) {
            Ok(()) => {
                instance.child = Some(child);
                return Ok(());
            }
            // It exited before listening: again, shortly.
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) if !left.is_zero() => {
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(250));
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("instance i{i} did not start listening within 30 s").into());
            }
        }
    }
}

fn stop_instance(instance: &mut InstanceProc) {
    if let Some(mut child) = instance.child.take() {
        signal(child.id(), "CONT");
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status();
}

/// A fault, as planned from the seed.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// `SIGKILL` an instance, and start it again after `down_ms`.
    Kill { instance: usize, down_ms: u64 },
    /// `SIGSTOP` an instance for `ms` (longer than the lease), then `SIGCONT`.
    Stop { instance: usize, ms: u64 },
    /// Crash the store (`pg_ctl stop -m immediate`, `SIGKILL` of Redis or of one cluster
    /// master) and start it again after `down_ms`.
    StoreRestart { node: usize, down_ms: u64 },
    /// Kill every client connection of the store (`pg_terminate_backend`, `CLIENT KILL`).
    KillConnections,
    /// Add latency to one instance's store connection for `ms`.
    Latency {
        instance: usize,
        latency_ms: u64,
        ms: u64,
    },
    /// Forward nothing on one instance's store connection for `ms` (then deliver it).
    Blackhole { instance: usize, ms: u64 },
    /// Reset one instance's store connections, and refuse new ones for `ms`.
    Reset { instance: usize, ms: u64 },
}

impl Fault {
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Kill { .. } => "kill",
            Fault::Stop { .. } => "stop",
            Fault::StoreRestart { .. } => "store-restart",
            Fault::KillConnections => "kill-conns",
            Fault::Latency { .. } => "latency",
            Fault::Blackhole { .. } => "blackhole",
            Fault::Reset { .. } => "reset",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Planned {
    at_ms: u64,
    fault: Fault,
}

/// The fault schedule: the same for the same seed and settings. Nothing in the first
/// interval, and the last two are quiet, so that the run ends healed.
fn plan(args: &Args, mode: Mode, duration: Duration) -> Vec<Planned> {
    let mut rng = Rng::new(args.seed.wrapping_mul(31).wrapping_add(mode as u64));
    let every = args.fault_every_ms;
    let end = (duration.as_millis() as u64).saturating_sub(2 * every);
    let lease = args.lease_ms;
    let n = args.instances;
    let mut planned = Vec::new();
    let mut at = every;
    while at < end {
        let instance = rng.below(n as u64) as usize;
        let kinds: &[&str] = match mode {
            // No proxy in front of a cluster (its clients follow the nodes' own addresses).
            Mode::Cluster => &["kill", "stop", "store-restart", "kill-conns"],
            _ => &[
                "kill",
                "stop",
                "store-restart",
                "kill-conns",
                "latency",
                "blackhole",
                "reset",
            ],
        };
        let fault = match kinds[rng.below(kinds.len() as u64) as usize] {
            "kill" => Fault::Kill {
                instance,
                down_ms: 300 + rng.below(1000),
            },
            "stop" => Fault::Stop {
                instance,
                ms: lease * 3 / 2 + rng.below(lease * 2),
            },
            "store-restart" => Fault::StoreRestart {
                node: rng.below(3) as usize,
                down_ms: rng.below(1000),
            },
            "kill-conns" => Fault::KillConnections,
            "latency" => Fault::Latency {
                instance,
                latency_ms: 50 + rng.below(250),
                ms: 1000 + rng.below(2000),
            },
            "blackhole" => Fault::Blackhole {
                instance,
                ms: 300 + rng.below(lease * 2),
            },
            _ => Fault::Reset {
                instance,
                ms: rng.below(lease),
            },
        };
        planned.push(Planned { at_ms: at, fault });
        at += every / 2 + rng.below(every);
    }
    planned
}

/// Applies the schedule, recording each fault's window in the history.
async fn inject(
    schedule: Vec<Planned>,
    sut: Arc<Sut>,
    exe: PathBuf,
    clock: Clock,
    history: Arc<Mutex<History>>,
) -> Result<(), Error> {
    let mut ending = Vec::new();
    for planned in schedule {
        let wait = planned.at_ms as f64 - clock.now();
        if wait > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(wait / 1000.0)).await;
        }
        let start = clock.now();
        let fault = planned.fault;
        let (sut, exe, history) = (sut.clone(), exe.clone(), history.clone());
        // Each fault on a task of its own: a long one (a stop) overlaps the next.
        ending.push(tokio::spawn(async move {
            let target = apply(&sut, fault, &exe, clock, &history).await;
            if let Err(error) = &target {
                eprintln!("   fault {fault:?} failed: {error}");
            }
            history.lock().unwrap().faults.push(check::FaultWindow {
                kind: fault.kind(),
                instance: target.ok().flatten(),
                start,
                end: clock.now(),
            });
        }));
    }
    for fault in ending {
        fault.await?;
    }
    Ok(())
}

/// Applies one fault until it ends; the instance it hit, if one.
async fn apply(
    sut: &Sut,
    fault: Fault,
    exe: &std::path::Path,
    clock: Clock,
    history: &Arc<Mutex<History>>,
) -> Result<Option<usize>, Error> {
    let sleep = |ms: u64| tokio::time::sleep(Duration::from_millis(ms));
    match fault {
        Fault::Kill { instance, down_ms } => {
            let mut proc = sut.instances[instance].lock().await;
            if let Some(mut child) = proc.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            sleep(down_ms).await;
            tokio::task::block_in_place(|| {
                start_instance(&mut proc, instance, exe, clock, history)
            })?;
            Ok(Some(instance))
        }
        Fault::Stop { instance, ms } => {
            let pid = sut.instances[instance]
                .lock()
                .await
                .child
                .as_ref()
                .map(Child::id);
            if let Some(pid) = pid {
                signal(pid, "STOP");
                sleep(ms).await;
                signal(pid, "CONT");
            }
            Ok(Some(instance))
        }
        Fault::StoreRestart { node, down_ms } => {
            // pg_ctl and redis-server are waited for: off the runtime's workers.
            tokio::task::block_in_place(|| {
                let _one_at_a_time = sut.restarting.lock().unwrap();
                match sut.mode {
                    Mode::Postgres | Mode::PostgresAtomic => {
                        sut.postgres.kill()?;
                        std::thread::sleep(Duration::from_millis(down_ms));
                        sut.postgres.start_again()
                    }
                    Mode::RedisAof | Mode::Redis => {
                        let mut redis = sut.redis.as_ref().unwrap().lock().unwrap();
                        redis.kill();
                        std::thread::sleep(Duration::from_millis(down_ms));
                        redis.start_again()
                    }
                    Mode::Cluster => {
                        let mut cluster = sut.cluster.as_ref().unwrap().lock().unwrap();
                        cluster.nodes[node].kill();
                        std::thread::sleep(Duration::from_millis(down_ms));
                        cluster.nodes[node].start_again()?;
                        cluster.wait_ok()
                    }
                }
            })?;
            Ok(None)
        }
        Fault::KillConnections => {
            match sut.mode {
                Mode::Postgres | Mode::PostgresAtomic => {
                    let pool = connect_postgres(&sut.postgres.url()).await?;
                    sqlx::query(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                          WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'",
                    )
                    .execute(&pool)
                    .await?;
                }
                Mode::RedisAof | Mode::Redis => {
                    let redis = sut.redis.as_ref().unwrap().lock().unwrap();
                    redis.cli(&["client", "kill", "type", "normal"]);
                    redis.cli(&["client", "kill", "type", "pubsub"]);
                }
                Mode::Cluster => {
                    let cluster = sut.cluster.as_ref().unwrap().lock().unwrap();
                    for node in &cluster.nodes {
                        node.cli(&["client", "kill", "type", "normal"]);
                        node.cli(&["client", "kill", "type", "pubsub"]);
                    }
                }
            }
            Ok(None)
        }
        Fault::Latency {
            instance,
            latency_ms,
            ms,
        } => {
            sut.proxies[instance].set_latency(Duration::from_millis(latency_ms));
            sleep(ms).await;
            sut.proxies[instance].set_latency(Duration::ZERO);
            Ok(Some(instance))
        }
        Fault::Blackhole { instance, ms } => {
            sut.proxies[instance].set_blackhole(true);
            sleep(ms).await;
            sut.proxies[instance].set_blackhole(false);
            Ok(Some(instance))
        }
        Fault::Reset { instance, ms } => {
            sut.proxies[instance].set_refuse(true);
            sut.proxies[instance].reset();
            sleep(ms).await;
            sut.proxies[instance].set_refuse(false);
            Ok(Some(instance))
        }
    }
}

/// After the last fault: no proxy faults, every instance running and not stopped.
async fn heal(
    sut: &Sut,
    exe: &std::path::Path,
    clock: Clock,
    history: &Arc<Mutex<History>>,
) -> Result<(), Error> {
    for proxy in &sut.proxies {
        proxy.heal();
    }
    for (i, instance) in sut.instances.iter().enumerate() {
        let mut instance = instance.lock().await;
        match instance.child.as_ref().map(Child::id) {
            Some(pid) => signal(pid, "CONT"),
            None => tokio::task::block_in_place(|| {
                start_instance(&mut instance, i, exe, clock, history)
            })?,
        }
    }
    Ok(())
}

/// The clients: each sends requests over a moving window of keys (by default a new key
/// every 25 ms, 32 in play), 5% of them reusing the key with another body, and retries an answer it
/// can't use (a 5xx, a 409, a transport error or a timeout) like a real client: the same
/// key and body, on a random instance, after a backoff, up to 8 attempts.
#[derive(Clone)]
struct Workload {
    client: reqwest::Client,
    addrs: Vec<std::net::SocketAddr>,
    mode: Mode,
    seed: u64,
    clock: Clock,
    until: f64,
    key_every_ms: f64,
    keys_in_play: u64,
    history: Arc<Mutex<History>>,
}

/// A request's deadline: an attempt with no answer by then is a timeout.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

impl Workload {
    fn key(&self, k: u64) -> String {
        format!("{}-{}-k{k}", self.mode.name(), self.seed)
    }

    /// Even keys are payments (`/payments`, the key in `Idempotency-Key`), odd keys
    /// clients (`/clients`, the key in the body's `id`).
    fn route(k: u64) -> &'static str {
        if k.is_multiple_of(2) {
            "/payments"
        } else {
            "/clients"
        }
    }

    /// The key's own body, and the one a reuse sends.
    fn body(&self, k: u64, reuse: bool) -> String {
        let amount = (k * 7919) % 10_000 + u64::from(reuse);
        match Self::route(k) {
            "/payments" => format!("{{\"amount\":{amount}}}"),
            _ => format!("{{\"id\":\"{}\",\"amount\":{amount}}}", self.key(k)),
        }
    }

    async fn client(self, c: u64) {
        let mut rng = Rng::new(self.seed ^ (c << 32) ^ 0x5eed);
        let mut n = 0;
        while self.clock.now() < self.until {
            let k = (self.clock.now() / self.key_every_ms) as u64 + rng.below(self.keys_in_play);
            let reuse = rng.chance(0.05);
            let request = (c << 32) | n;
            n += 1;
            self.request(request, k, reuse, &mut rng).await;
        }
    }

    async fn request(&self, request: u64, k: u64, reuse: bool, rng: &mut Rng) {
        let (key, body) = (self.key(k), self.body(k, reuse));
        let route = Self::route(k);
        let mut backoff = 50;
        for _ in 0..8 {
            let instance = rng.below(self.addrs.len() as u64) as usize;
            let start = self.clock.now();
            let outcome = self.send(instance, route, &key, &body).await;
            let again = match &outcome {
                check::Outcome::Answer(status, _) => *status >= 500 || *status == 409,
                check::Outcome::Error { .. } => true,
            };
            self.history.lock().unwrap().attempts.push(check::Attempt {
                request,
                route,
                key: key.clone(),
                body: body.clone(),
                instance,
                start,
                end: self.clock.now(),
                outcome,
            });
            if !again || self.clock.now() > self.until + 30_000.0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(backoff)).await;
            backoff = (backoff * 2).min(1000);
        }
    }

    async fn send(&self, instance: usize, route: &str, key: &str, body: &str) -> check::Outcome {
        let mut post = self
            .client
            .post(format!("http://{}{route}", self.addrs[instance]));
        if route == "/payments" {
            post = post.header("idempotency-key", key);
        }
        let sent = post
            .header("content-type", "application/json")
            .body(body.to_owned())
            .timeout(ATTEMPT_TIMEOUT)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(error) => {
                return check::Outcome::Error {
                    timed_out: error.is_timeout(),
                };
            }
        };
        let status = response.status().as_u16();
        match response.text().await {
            Ok(text) => check::Outcome::Answer(status, text),
            Err(error) => check::Outcome::Error {
                timed_out: error.is_timeout(),
            },
        }
    }
}

/// Asks every key that ever got a 2xx, or has an effect, once more, with the body that got
/// it (retrying
/// transport errors and 5xx a few times: the store may still be coming back).
/// How long an instance has, after the faults healed, to answer a fresh request.
const RECOVERY: Duration = Duration::from_secs(20);

/// The instances that answered no fresh request with a `2xx` within [`RECOVERY`] of the
/// faults healing. The probe's key is its own (no client's), so it is in no history.
async fn recovered(workload: &Workload) -> Vec<usize> {
    let probes = (0..workload.addrs.len()).map(|instance| async move {
        let deadline = Instant::now() + RECOVERY;
        for attempt in 0.. {
            let key = format!(
                "{}-{}-recovery-i{instance}-{attempt}",
                workload.mode.name(),
                workload.seed
            );
            let body = format!("{{\"probe\":{attempt}}}");
            if let check::Outcome::Answer(200..=299, _) =
                workload.send(instance, "/payments", &key, &body).await
            {
                return None;
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        println!(
            "   instance {instance} answered no fresh request within {RECOVERY:?} of the healing"
        );
        Some(instance)
    });
    futures::future::join_all(probes)
        .await
        .into_iter()
        .flatten()
        .collect()
}

async fn final_pass(workload: &Workload, effect_bodies: Vec<(String, String)>) {
    let answered: Vec<(String, (String, &'static str))> = {
        let history = workload.history.lock().unwrap();
        let mut seen = HashMap::new();
        let mut routes = HashMap::new();
        for attempt in &history.attempts {
            routes.insert(attempt.key.as_str(), attempt.route);
            if let check::Outcome::Answer(200..=299, _) = attempt.outcome {
                seen.entry(attempt.key.clone())
                    .or_insert_with(|| (attempt.body.clone(), attempt.route));
            }
        }
        for (key, body) in effect_bodies {
            if let Some(&route) = routes.get(key.as_str()) {
                seen.entry(key).or_insert((body, route));
            }
        }
        seen.into_iter().collect()
    };
    // Asked of the instances that recovered (of all, if none did: every answer is then lost).
    let unrecovered = workload.history.lock().unwrap().unrecovered.clone();
    let mut serving: Vec<usize> = (0..workload.addrs.len())
        .filter(|i| !unrecovered.contains(i))
        .collect();
    if serving.is_empty() {
        serving = (0..workload.addrs.len()).collect();
    }
    let mut rng = Rng::new(workload.seed ^ 0xf1a1);
    let mut finals = HashMap::new();
    for chunk in answered.chunks(32) {
        let asks = chunk.iter().map(|(key, (body, route))| {
            let instance = serving[rng.below(serving.len() as u64) as usize];
            async move {
                let mut outcome = workload.send(instance, route, key, body).await;
                for _ in 0..10 {
                    match outcome {
                        check::Outcome::Answer(status, _) if status < 500 => break,
                        _ => {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            outcome = workload.send(instance, route, key, body).await;
                        }
                    }
                }
                (key.clone(), outcome)
            }
        });
        finals.extend(futures::future::join_all(asks).await);
    }
    workload.history.lock().unwrap().finals = finals;
}
