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
    // Cargo sets CARGO_FEATURE_<NAME> for the build script of a crate built
    // with that feature.
    let transport = std::env::var_os("CARGO_FEATURE_TRANSPORT").is_some();
    std::fs::write(out.join("omnirelay_descriptor.bin"), prost::Message::encode_to_vec(&descriptors))?;
    // Two passes. The first generates every package but the hub's.
    let (hub, others): (Vec<_>, Vec<_>) =
        descriptors.file.iter().cloned().partition(|file| file.package() == "omnirelay.hub.v1");
    tonic_prost_build::configure()
        // Maps encode in key order: the encoding of an event is canonical, which
        // the hash chain and byte-for-byte replay comparisons rely on.
        .btree_map(".")
        .bytes(".")
        .build_transport(transport)
        .compile_fds(prost_types::FileDescriptorSet { file: others.clone() })?;
    // The second generates the hub's package with every `ReplicationEvent`
    // field as `RawEvent`, the event's bytes exactly as they travel: the hub
    // stores and hashes what producers sent (fields it does not know
    // included) and serves stored bytes without decoding and re-encoding
    // them. On the wire nothing changes.
    let mut hub_set = prost_types::FileDescriptorSet { file: others };
    hub_set.file.extend(hub);
    let mut config = tonic_prost_build::configure()
        .btree_map(".")
        .bytes(".")
        .build_transport(transport)
        .extern_path(".omnirelay.resourcelease.v1", "crate::resourcelease::v1")
        .extern_path(".omnirelay.replication.v1", "crate::replication::v1")
        .extern_path(".omnirelay.replication.v1.ReplicationEvent", "crate::raw::RawEvent");
    config = config.out_dir(out.join("hub"));
    std::fs::create_dir_all(out.join("hub"))?;
    config.compile_fds(hub_set)?;
    Ok(())
}
