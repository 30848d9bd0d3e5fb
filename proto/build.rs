//! Compiles muster/v1/*.proto with a vendored protoc, so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);

    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "muster/v1/types.proto",
        "muster/v1/node.proto",
        "muster/v1/fleet.proto",
    ];
    // `build_transport(false)`: the generated `connect` constructor would clash with the
    // `NodeService.Connect` rpc that DESIGN.md names; clients build a Channel themselves.
    tonic_prost_build::configure()
        .build_transport(false)
        .file_descriptor_set_path(out.join("muster_descriptor.bin"))
        .compile_protos(&protos, &["."])?;
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
