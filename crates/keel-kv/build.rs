//! Generates the etcd v3-compatible API (Keel's own `.proto` files for the subset it serves).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A system protoc is not required: use the vendored binary unless PROTOC is set explicitly.
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(false)
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
    Ok(())
}
