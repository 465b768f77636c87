//! The README's quick start: `tp dev --demo` runs the example journey end to end on a
//! real redis-server, and Ctrl-C leaves nothing behind.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

const TP: &str = env!("CARGO_BIN_EXE_tp");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

#[test]
fn the_demo_runs_the_whole_journey_and_ctrl_c_cleans_up() {
    let listen = format!("127.0.0.1:{}", free_port());
    let mut child = Command::new(TP)
        .args(["dev", "--demo", "--listen", &listen])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tp dev");
    let (lines_tx, lines) = mpsc::channel::<String>();
    for stream in [
        Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().expect("stderr")),
    ] {
        let tx = lines_tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }

    // The demo's wait is 20 s; both contacts must get every step of their branch.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut seen = Vec::new();
    let done = |seen: &[String]| seen.iter().filter(|l| l.contains("step remind")).count() == 2;
    while !done(&seen) {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => {
                let _ = child.kill();
                panic!("the demo did not finish; output:\n{}", seen.join("\n"));
            }
        }
    }
    let deliveries: Vec<&String> = seen.iter().filter(|l| l.starts_with("[console:")).collect();
    let text = seen.join("\n");
    assert_eq!(deliveries.len(), 8, "{text}");
    assert!(
        text.contains("王芳，欢迎！新人券 WELCOME10 已到账"),
        "{text}"
    );
    assert!(
        text.contains("step invite-vip") && text.contains("vip-club"),
        "{text}"
    );
    assert!(
        text.contains("step invite-edu") && text.contains("product-school"),
        "{text}"
    );
    let data_dir = text
        .split_whitespace()
        .find(|word| word.contains("touchpoint-dev-"))
        .map(|word| word.trim_matches(|c| c == '(' || c == ')').to_owned())
        .expect("the banner names the data folder");

    // Ctrl-C: everything stops and the data folder is removed.
    let pid = child.id().to_string();
    let status = Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill -INT");
    assert!(status.success());
    let exit = child.wait().expect("tp dev exits");
    assert!(exit.success(), "tp dev exited with {exit:?}");
    assert!(
        !std::path::Path::new(&data_dir).exists(),
        "{data_dir} was left behind"
    );
}

#[test]
fn without_redis_server_it_says_what_to_install() {
    let output = Command::new(TP)
        .args(["dev", "--listen", &format!("127.0.0.1:{}", free_port())])
        .env("PATH", "/nonexistent")
        .output()
        .expect("run tp dev");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("redis-server not found"), "{stderr}");
    assert!(stderr.contains("apt-get install redis-server"), "{stderr}");
}

/// `tp dev` killed with SIGKILL cannot stop its Redis; Redis goes with it all the same
/// (Linux, util-linux's `setpriv`), instead of running on, orphaned.
#[cfg(target_os = "linux")]
#[test]
fn its_redis_dies_with_it_when_it_is_killed() {
    let listen = format!("127.0.0.1:{}", free_port());
    let mut child = Command::new(TP)
        .args(["dev", "--listen", &listen])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tp dev");
    let banner_out = child.stderr.take().expect("stderr");
    let (lines_tx, lines) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(banner_out).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut banner = String::new();
    while !banner.contains("scheduler  http") {
        match lines.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => banner.push_str(&line),
            Err(_) => {
                let _ = child.kill();
                panic!("tp dev did not come up: {banner}");
            }
        }
    }
    let redis = redis_children(child.id());
    assert_eq!(redis.len(), 1, "tp dev's redis-server: {redis:?}");

    child.kill().expect("kill -9 tp dev");
    child.wait().expect("reap tp dev");
    let deadline = Instant::now() + Duration::from_secs(10);
    while is_alive(redis[0]) {
        assert!(
            Instant::now() < deadline,
            "redis-server {} outlived tp dev",
            redis[0]
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Some(data) = banner
        .split_whitespace()
        .find(|word| word.contains("touchpoint-dev-"))
    {
        let _ = std::fs::remove_dir_all(data.trim_matches(|c| c == '(' || c == ')'));
    }
}

/// `/proc/<pid>/stat` after the command name: state, parent pid, ...
#[cfg(target_os = "linux")]
fn stat_after_name(pid: &str) -> Option<(String, Vec<String>)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, rest) = stat.rsplit_once(')')?;
    let name = head.split_once('(')?.1.to_owned();
    Some((name, rest.split_whitespace().map(str::to_owned).collect()))
}

/// The `redis-server` processes whose parent is `parent`.
#[cfg(target_os = "linux")]
fn redis_children(parent: u32) -> Vec<u32> {
    let parent = parent.to_string();
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            stat_after_name(&pid.to_string()).is_some_and(|(name, fields)| {
                name == "redis-server" && fields.get(1) == Some(&parent)
            })
        })
        .collect()
}

/// Running: there and not a zombie waiting to be reaped.
#[cfg(target_os = "linux")]
fn is_alive(pid: u32) -> bool {
    stat_after_name(&pid.to_string()).is_some_and(|(_, fields)| fields[0] != "Z")
}
