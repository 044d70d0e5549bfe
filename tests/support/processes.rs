//! Instances of an app as separate processes: the test binary run again, with one test
//! (the instance's `main`) selected and its settings in the environment; its stdout lines
//! arrive on a channel, and it is killed (`SIGKILL`) on drop.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;

/// An instance process, killed on drop; its stdout lines arrive on `lines`.
pub struct Instance {
    child: Child,
    pub addr: SocketAddr,
    lines: mpsc::Receiver<String>,
}

impl Instance {
    /// Runs the test `main` of this binary as an instance, with `env`, and waits until it
    /// prints `listening <addr>`.
    pub fn spawn(main: &str, env: &[(&str, String)]) -> Instance {
        let mut command = Command::new(std::env::current_exe().unwrap());
        command
            .args([main, "--exact", "--nocapture", "--test-threads=1"])
            .envs(env.iter().map(|(name, value)| (name, value)))
            .stdout(Stdio::piped());
        let mut child = command.spawn().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        // Killed on drop from here on, should the wait below fail.
        let mut instance = Instance {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            lines: mpsc::channel().1,
        };
        let (send, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                let _ = send.send(line);
            }
        });
        // libtest prints `test instance_process ... ` before the test's own output.
        instance.addr = loop {
            let line = lines
                .recv_timeout(Duration::from_secs(30))
                .expect("the instance process did not start listening");
            if let Some((_, addr)) = line.split_once("listening ") {
                break addr.parse().unwrap();
            }
        };
        instance.lines = lines;
        instance
    }

    /// Whether the instance printed `line` within `within`.
    pub fn said(&self, line: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(said) if said == line => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
        false
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The index of the instance that prints `line` first.
pub fn first_to_say(instances: &[Instance], line: &str) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(i) = instances
            .iter()
            .position(|i| i.said(line, Duration::from_millis(50)))
        {
            return i;
        }
        assert!(Instant::now() < deadline, "no instance said {line:?}");
    }
}

pub async fn post(addr: SocketAddr, key: &str) -> Result<(StatusCode, String), reqwest::Error> {
    let res = reqwest::Client::new()
        .post(format!("http://{addr}/orders"))
        .header("idempotency-key", key)
        .body("2 apples")
        .timeout(Duration::from_secs(30))
        .send()
        .await?;
    Ok((res.status(), res.text().await?))
}

pub type Posted = tokio::task::JoinHandle<Result<(StatusCode, String), reqwest::Error>>;

/// `n` concurrent posts of `key` to each of `addrs`, each on a task (and connection) of
/// its own.
pub fn fire(addrs: impl Iterator<Item = SocketAddr>, n: usize, key: &str) -> Vec<Posted> {
    addrs
        .flat_map(|addr| std::iter::repeat_n(addr, n))
        .map(|addr| {
            let key = key.to_owned();
            tokio::spawn(async move { post(addr, &key).await })
        })
        .collect()
}

/// Sends 50 POSTs of key `k` to each instance, kills (`SIGKILL`) the instance that starts
/// running it after 700 ms (long enough for the others' callers to wait, and for a lease
/// renewal or two), and returns the survivors' answers and how long after the kill the last
/// of them came. Every answer of the killed instance's callers must be a transport error.
pub async fn kill_the_leader_mid_run(
    mut instances: Vec<Instance>,
) -> (Vec<(StatusCode, String)>, Duration, Vec<Instance>) {
    let requests: Vec<_> = instances
        .iter()
        .map(|i| fire(std::iter::once(i.addr), 50, "k"))
        .collect();
    let leader = first_to_say(&instances, "running 1");
    tokio::time::sleep(Duration::from_millis(700)).await;

    let killed = Instant::now();
    drop(instances.remove(leader));
    let mut survivors = Vec::new();
    for (i, requests) in requests.into_iter().enumerate() {
        let answers = futures::future::join_all(requests).await;
        if i == leader {
            assert!(answers.iter().all(|a| a.as_ref().unwrap().is_err()));
        } else {
            survivors.extend(answers.into_iter().map(|a| a.unwrap().unwrap()));
        }
    }
    let takeover = killed.elapsed();
    eprintln!(
        "all {} survivors answered {takeover:?} after the kill",
        survivors.len()
    );
    (survivors, takeover, instances)
}
