fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "trellis/events/v1/events.proto",
        "trellis/network/v1/network.proto",
        "trellis/service/v1/service.proto",
        "trellis/storage/v1/storage.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    tonic_prost_build::configure()
        // Layer bytes pass through the storage service without a copy.
        .bytes(".trellis.storage.v1.ImportLayerChunk.data")
        .compile_protos(&protos, &["."])?;
    Ok(())
}
