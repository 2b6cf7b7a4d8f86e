//! Compiles the `.proto` contracts with protox (pure Rust), so building needs
//! no system `protoc`.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "omnirelay/resourcelease/v1/resourcelease.proto",
    "omnirelay/replication/v1/replication.proto",
    "omnirelay/hub/v1/hub.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={}", root.join(proto).display());
    }
    let descriptors = protox::compile(PROTOS, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("omnirelay_descriptor.bin"), prost::Message::encode_to_vec(&descriptors))?;
    tonic_prost_build::configure()
        // Maps encode in key order: the encoding of an event is canonical, which
        // the hash chain and byte-for-byte replay comparisons rely on.
        .btree_map(".")
        .bytes(".")
        .compile_fds(descriptors)?;
    Ok(())
}
