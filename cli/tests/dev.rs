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
