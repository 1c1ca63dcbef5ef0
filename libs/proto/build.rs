//! Compiles proto/ with protox (no system protoc) into OUT_DIR.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let inference = root.join("inference");
    let files = [
        inference.join("grpc_service.proto"),
        inference.join("model_config.proto"),
    ];
    let registry = root.join("shamal/registry/v1/registry.proto");
    println!("cargo:rerun-if-changed={}", registry.display());
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let descriptors = protox::compile(&files, [&inference])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join("inference_descriptor.bin");
    std::fs::write(&descriptor_path, descriptors.encode_to_vec())?;

    tonic_prost_build::configure()
        .skip_protoc_run()
        .file_descriptor_set_path(&descriptor_path)
        // Tensor payloads are shared, not copied, between decode, batcher and encode.
        .bytes(".inference")
        // RPCs Shamal does not implement answer UNIMPLEMENTED by default.
        .generate_default_stubs(true)
        .compile_protos(&files, &[inference])?;

    // Internal service protocols, one descriptor set each.
    let registry_descriptors = protox::compile([&registry], [&root])?;
    let registry_descriptor_path = out_dir.join("registry_descriptor.bin");
    std::fs::write(
        &registry_descriptor_path,
        registry_descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .skip_protoc_run()
        .file_descriptor_set_path(&registry_descriptor_path)
        .bytes(".shamal.registry.v1.ArtifactChunk")
        .compile_protos(&[registry], &[root])?;
    Ok(())
}
