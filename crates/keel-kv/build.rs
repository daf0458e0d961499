//! Generates the etcd v3-compatible API (Keel's own `.proto` files for the subset it serves), and
//! serde impls for its messages in protobuf's JSON mapping for the grpc-gateway routes
//! (`src/gateway.rs`): original field names on output as etcd's gateway writes them
//! (`OrigName: true`), both spellings accepted on input, unknown fields ignored as etcd's gateway
//! ignores them.

use std::path::PathBuf;

const PACKAGES: [&str; 5] = [".etcdserverpb", ".mvccpb", ".authpb", ".v3lockpb", ".v3electionpb"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A system protoc is not required: use the vendored binary unless PROTOC is set explicitly.
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    println!("cargo:rerun-if-changed=proto");
    let descriptors = PathBuf::from(std::env::var("OUT_DIR")?).join("etcd_descriptors.bin");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(false)
        .file_descriptor_set_path(&descriptors)
        .compile_protos(
            &[
                "proto/etcdserverpb/rpc.proto",
                "proto/mvccpb/kv.proto",
                "proto/authpb/auth.proto",
                "proto/v3lockpb/v3lock.proto",
                "proto/v3electionpb/v3election.proto",
            ],
            &["proto"],
        )?;
    pbjson_build::Builder::new()
        .register_descriptors(&std::fs::read(&descriptors)?)?
        .preserve_proto_field_names()
        .ignore_unknown_fields()
        .build(&PACKAGES)?;
    Ok(())
}
