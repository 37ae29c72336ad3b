//! What the benchmarks share: the release server binary as a child process.

// Each benchmark uses a part of this module.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub struct Server {
    pub child: std::process::Child,
    pub base: String,
    pub grpc: Option<String>,
}

impl Server {
    pub fn start(args: &[String]) -> Server {
        Self::start_with_env(args, &[])
    }

    /// [`Server::start`] with extra environment variables. `VISIONSERVE_BENCH_BIN` runs another
    /// build of the server instead of this one (an older commit's, for a before-and-after).
    pub fn start_with_env(args: &[String], envs: &[(&str, &str)]) -> Server {
        let binary = std::env::var_os("VISIONSERVE_BENCH_BIN")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_visionserve").into());
        let mut child = Command::new(binary)
            .args(args)
            .args([
                "--port",
                "0",
                "--log-format",
                "json",
                "--log",
                "warn,visionserve=info",
            ])
            .envs(envs.iter().copied())
            .stderr(Stdio::piped())
            .spawn()
            .expect("server binary starts");
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        let (grpc_tx, grpc_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                if let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) {
                    match event["message"].as_str() {
                        Some("listening") => {
                            let _ = tx.send(event["address"].as_str().unwrap().to_owned());
                        }
                        Some("gRPC listening") => {
                            let _ = grpc_tx.send(event["address"].as_str().unwrap().to_owned());
                        }
                        Some("model loaded and warmed up") => {
                            eprintln!("warm-up: {}", event["warmup"])
                        }
                        _ => {}
                    }
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("server address");
        // The gRPC address is logged before the HTTP one, when there is one.
        let grpc = grpc_rx.try_recv().ok().map(|a| format!("http://{a}"));
        Server {
            child,
            base: format!("http://{addr}"),
            grpc,
        }
    }

    pub async fn wait_ready(&self, client: &reqwest::Client) {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let ready = client
                .get(format!("{}/health/ready", self.base))
                .send()
                .await;
            if ready.is_ok_and(|r| r.status() == 200) {
                return;
            }
            assert!(Instant::now() < deadline, "server not ready");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: SIGTERM to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}
