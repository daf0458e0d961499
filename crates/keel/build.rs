//! Generates the gRPC peer transport code from `proto/peer.proto`, with a vendored `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A system protoc is not required: use the vendored binary unless PROTOC is set explicitly.
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    println!("cargo:rerun-if-changed=proto/peer.proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(false)
        .compile_protos(&["proto/peer.proto"], &["proto"])?;
    Ok(())
}
