//! The broker a bench starts for itself: the same `ferry` binary as a child process on
//! 127.0.0.1:0, and what /proc says about its CPU time and peak memory.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, SysconfVar, sysconf};

/// How long the child may take to say it is listening.
const START_TIMEOUT: Duration = Duration::from_secs(10);

pub struct BrokerChild {
    child: Child,
    pub addr: SocketAddr,
}

/// CPU time used by a process so far (user + system, all threads).
#[derive(Debug, Clone, Copy)]
pub struct CpuTime(pub Duration);

impl BrokerChild {
    /// Starts `EXE broker --addr 127.0.0.1:0 EXTRA...` (EXE defaults to this binary) and
    /// waits for `listening on`.
    pub fn start(
        exe: Option<&std::path::Path>,
        extra_args: &[String],
    ) -> anyhow::Result<BrokerChild> {
        let exe = match exe {
            Some(exe) => exe.to_owned(),
            None => std::env::current_exe().context("cannot find the ferry binary")?,
        };
        let mut child = Command::new(exe)
            .args(["broker", "--addr", "127.0.0.1:0"])
            .args(extra_args)
            .env("RUST_LOG", "warn,ferry::cli::broker=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start the broker")?;
        let stderr = child.stderr.take().context("no broker stderr")?;
        let (addr_tx, addr_rx) = mpsc::channel();
        // The reader runs until the broker exits, so the pipe never fills and blocks it.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("listening on ").nth(1) {
                    let _ = addr_tx.send(addr.trim().to_owned());
                } else if line.contains("ERROR") || line.contains("WARN") {
                    eprintln!("broker: {line}");
                }
            }
        });
        let addr = match addr_rx.recv_timeout(START_TIMEOUT) {
            Ok(addr) => addr
                .parse()
                .context("the broker logged an unreadable address")?,
            Err(_) => {
                let _ = child.kill();
                bail!("the broker did not start listening within {START_TIMEOUT:?}");
            }
        };
        Ok(BrokerChild { child, addr })
    }

    pub fn cpu_time(&self) -> anyhow::Result<CpuTime> {
        process_cpu_time(&format!("/proc/{}/stat", self.child.id()))
    }

    /// Peak resident memory (VmHWM) in bytes.
    pub fn peak_rss_bytes(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let kib = status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .context("no VmHWM in /proc status")?;
        Ok(kib * 1024)
    }

    /// Stops the broker gracefully (SIGINT) and waits for it.
    pub fn stop(mut self) -> anyhow::Result<()> {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGINT)?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for BrokerChild {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// CPU time of this process, for the load generator's share of the machine.
pub fn own_cpu_time() -> anyhow::Result<CpuTime> {
    process_cpu_time("/proc/self/stat")
}

fn process_cpu_time(stat_path: &str) -> anyhow::Result<CpuTime> {
    let stat = std::fs::read_to_string(stat_path)?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let after_name = stat.rsplit_once(')').context("malformed /proc stat")?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks: u64 = fields
        .get(11..13)
        .context("short /proc stat")?
        .iter()
        .map(|f| f.parse::<u64>())
        .sum::<Result<u64, _>>()?;
    let per_second = sysconf(SysconfVar::CLK_TCK)?.context("no CLK_TCK")? as u64;
    Ok(CpuTime(Duration::from_secs_f64(
        ticks as f64 / per_second as f64,
    )))
}

/// Whole-machine CPU counters from /proc/stat, to tell how much time the hypervisor gave
/// to other guests (steal) while a run was measured.
#[derive(Debug, Clone, Copy)]
pub struct MachineCpu {
    total: u64,
    steal: u64,
}

impl MachineCpu {
    pub fn now() -> anyhow::Result<MachineCpu> {
        let stat = std::fs::read_to_string("/proc/stat")?;
        let line = stat.lines().next().context("empty /proc/stat")?;
        let fields: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(str::parse)
            .collect::<Result<_, _>>()?;
        // user nice system idle iowait irq softirq steal [guest guest_nice]; guest time
        // is already counted in user.
        let total = fields.iter().take(8).sum();
        let steal = *fields.get(7).context("no steal field in /proc/stat")?;
        Ok(MachineCpu { total, steal })
    }

    /// Percent of the machine's CPU time stolen since `earlier`.
    pub fn steal_percent_since(&self, earlier: &MachineCpu) -> f64 {
        let total = self.total.saturating_sub(earlier.total);
        if total == 0 {
            return 0.0;
        }
        100.0 * self.steal.saturating_sub(earlier.steal) as f64 / total as f64
    }
}
