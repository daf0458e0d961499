//! `keel demo` end to end: the real binary starts real keeld processes, kills the leader and must
//! report every step, lose no acknowledged write, and leave no keeld running and no directory
//! behind, whether it runs to the end or is stopped by Ctrl+C (SIGINT to keel alone, so that only
//! keel's own clean-up can stop the nodes).
//!
//! keeld is the sibling of the `keel` binary (`cargo build -p keel-kv`; `cargo nextest run
//! --workspace` builds every binary). The demo bounds each of its waits with a deadline.

use std::io::{BufRead as _, BufReader, Read as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

fn keeld() -> PathBuf {
    let keeld = Path::new(env!("CARGO_BIN_EXE_keel")).with_file_name("keeld");
    assert!(keeld.is_file(), "{} is missing: cargo build -p keel-kv", keeld.display());
    keeld
}

fn demo() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_keel"));
    command.arg("demo").arg("--keeld").arg(keeld()).stdin(Stdio::null());
    command
}

/// The demo's directory, from its "data and logs: DIR" line.
fn demo_dir(stdout: &str) -> PathBuf {
    let line = stdout.lines().find_map(|l| l.strip_prefix("data and logs: "));
    PathBuf::from(line.unwrap_or_else(|| panic!("no 'data and logs:' line in:\n{stdout}")))
}

/// Processes whose command line mentions `dir` (every keeld of the demo has its data dir in it),
/// as `pid: command line`.
fn processes_using(dir: &Path) -> Vec<String> {
    let dir = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        // A process may exit while being looked at: then it is not left running.
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&dir) {
            found.push(format!("{name}: {cmdline}"));
        }
    }
    found
}

/// The number after `prefix` on the line that has it.
fn number_after(stdout: &str, prefix: &str) -> u64 {
    let rest = stdout.split_once(prefix).unwrap_or_else(|| panic!("no '{prefix}' in:\n{stdout}")).1;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().unwrap_or_else(|_| panic!("no number after '{prefix}' in:\n{stdout}"))
}

#[test]
fn the_leader_dies_and_no_acknowledged_write_is_lost() {
    let out = demo().output().expect("run keel demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    for expected in [
        "[1/6] starting 3 keeld nodes … ready (",
        "      leader: node ",
        "[2/6] writing 100 keys … 100 acknowledged (",
        "[3/6] reading them back … 100 of 100 read, every value as written",
        "[4/6] killing the leader (node ",
        ") with SIGKILL, writes continuing",
        "      new leader: node ",
        "acknowledged writes readable: yes (no acknowledged write lost)",
        "[5/6] restarting node ",
        "caught up to applied index ",
        "acknowledged writes in its own state: yes",
        "[6/6] stopping the cluster … done",
    ] {
        assert!(stdout.contains(expected), "no '{expected}' in:\n{stdout}");
    }
    let leader = number_after(&stdout, "      leader: node ");
    assert_eq!(number_after(&stdout, "killing the leader (node "), leader, "{stdout}");
    assert_ne!(number_after(&stdout, "new leader: node "), leader, "{stdout}");
    assert_eq!(number_after(&stdout, "restarting node "), leader, "{stdout}");
    // Step 2's 100 and at least 40 more in step 4 (20 before the kill, 20 after the election).
    assert!(number_after(&stdout, "      all ") >= 140, "{stdout}");

    let dir = demo_dir(&stdout);
    assert_eq!(processes_using(&dir), Vec::<String>::new(), "keeld left running");
    assert!(!dir.exists(), "{} left behind", dir.display());
}

/// Sends SIGINT to keel alone (not its process group, as a terminal's Ctrl+C would) if the test
/// fails before it does, so that keel stops its nodes rather than leaving them orphaned.
struct Interrupt(Child);

impl Interrupt {
    fn send(&self) {
        let sent = Command::new("kill").arg("-INT").arg(self.0.id().to_string()).status().expect("run kill");
        assert!(sent.success(), "kill -INT failed");
    }
}

impl Drop for Interrupt {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            self.send();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn ctrl_c_stops_every_node_and_exits_130() {
    let child = demo().stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("run keel demo");
    let mut keel = Interrupt(child);
    let mut stdout = BufReader::new(keel.0.stdout.take().expect("piped stdout"));
    // Read up to the leader line: the nodes are then running (and step 2 is writing).
    let mut seen = String::new();
    while !seen.contains("      leader: node ") {
        let mut line = String::new();
        if stdout.read_line(&mut line).expect("read keel's stdout") == 0 {
            panic!("keel demo ended before its cluster was up:\n{seen}");
        }
        seen.push_str(&line);
    }
    let dir = demo_dir(&seen);
    assert!(!processes_using(&dir).is_empty(), "the demo's keeld processes should be running");

    keel.send();
    stdout.read_to_string(&mut seen).expect("read keel's stdout");
    let status = keel.0.wait().expect("keel exits");
    let mut stderr = String::new();
    keel.0.stderr.take().expect("piped stderr").read_to_string(&mut stderr).expect("read keel's stderr");
    assert_eq!(status.code(), Some(130), "stdout:\n{seen}\nstderr:\n{stderr}");
    assert!(seen.contains("interrupted\nstopping the cluster … done\n"), "{seen}");
    assert_eq!(stderr.trim_end(), "error: interrupted");
    assert_eq!(processes_using(&dir), Vec::<String>::new(), "keeld left running");
    assert!(!dir.exists(), "{} left behind", dir.display());
}

/// `--tls --hold`: the same demo with TLS on both ports; the `keel` command it prints (with
/// `--cacert`, `--cert`, `--key`) reads the demo's keys while the cluster is held; Ctrl+C then
/// ends the hold with exit 0, no keeld left and no directory.
#[test]
fn with_tls_every_step_runs_over_tls_and_the_printed_command_works() {
    let child = demo()
        .args(["--tls", "--hold"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run keel demo");
    let mut keel = Interrupt(child);
    let mut stdout = BufReader::new(keel.0.stdout.take().expect("piped stdout"));
    let mut seen = String::new();
    while !seen.contains("holding the cluster (--hold)") {
        let mut line = String::new();
        if stdout.read_line(&mut line).expect("read keel's stdout") == 0 {
            panic!("keel demo --tls ended before holding its cluster:\n{seen}");
        }
        seen.push_str(&line);
    }
    assert!(seen.contains("acknowledged writes in its own state: yes"), "{seen}");
    let dir = demo_dir(&seen);
    assert!(seen.contains(&format!("certificates (keel certs) in {}/certs", dir.display())), "{seen}");

    let try_keel = seen
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("try: keel "))
        .unwrap_or_else(|| panic!("no 'try: keel' line in:\n{seen}"));
    let args: Vec<&str> = try_keel.split_whitespace().collect();
    assert!(args.contains(&"--cacert") && args.contains(&"--cert") && args.contains(&"--key"), "{try_keel}");
    assert!(args[1].starts_with("https://"), "{try_keel}");
    let read = Command::new(env!("CARGO_BIN_EXE_keel")).args(&args).output().expect("run keel");
    let listed = String::from_utf8_lossy(&read.stdout);
    assert!(read.status.success(), "{}", String::from_utf8_lossy(&read.stderr));
    assert!(listed.starts_with("demo/0000\nvalue-0\n"), "{listed}");

    keel.send();
    stdout.read_to_string(&mut seen).expect("read keel's stdout");
    let status = keel.0.wait().expect("keel exits");
    assert_eq!(status.code(), Some(0), "{seen}");
    assert!(seen.contains("[6/6] stopping the cluster … done"), "{seen}");
    assert_eq!(processes_using(&dir), Vec::<String>::new(), "keeld left running");
    assert!(!dir.exists(), "{} left behind", dir.display());
}
