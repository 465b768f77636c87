//! Compiles `proto/` with protox (a pure-Rust protoc), so building needs no system protoc.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/touchpoint/v1/contact.proto",
        "proto/touchpoint/v1/dlq.proto",
        "proto/touchpoint/v1/playbook.proto",
        "proto/touchpoint/v1/policy.proto",
        "proto/touchpoint/v1/run.proto",
        "proto/touchpoint/v1/worker.proto",
        "proto/touchpoint/adapter/v1/adapter.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(files, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("touchpoint_descriptor.bin"),
        fds.encode_to_vec(),
    )?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
