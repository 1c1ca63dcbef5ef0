//! Compiles proto/ with protox (no system protoc) into OUT_DIR.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read when the script runs, not baked in when it is compiled: cargo may
    // reuse a compiled build script for a checkout at another path (a
    // second work tree sharing target/), which must read its own protos.
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
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
        .compile_protos(&files, std::slice::from_ref(&inference))?;

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
        .compile_protos(&[registry], std::slice::from_ref(&root))?;

    // Asynchronous inference: its messages embed the inference protocol's
    // (generated above, referenced through `crate::inference`).
    let async_inference = root.join("shamal/async/v1/async.proto");
    println!("cargo:rerun-if-changed={}", async_inference.display());
    // prost generates every file of the set, imports included: into a
    // directory of its own, so that the inference module generated above
    // is not overwritten (only `shamal.async.v1.rs` is used from there).
    let async_descriptors = protox::compile([&async_inference], [&root, &inference])?;
    let async_descriptor_path = out_dir.join("async_descriptor.bin");
    std::fs::write(&async_descriptor_path, async_descriptors.encode_to_vec())?;
    let async_out = out_dir.join("async");
    std::fs::create_dir_all(&async_out)?;
    tonic_prost_build::configure()
        .skip_protoc_run()
        .out_dir(&async_out)
        .file_descriptor_set_path(&async_descriptor_path)
        .extern_path(".inference", "crate::inference")
        .compile_protos(&[async_inference], &[root.clone(), inference])?;

    // The audit log.
    let audit = root.join("shamal/audit/v1/audit.proto");
    println!("cargo:rerun-if-changed={}", audit.display());
    let audit_descriptors = protox::compile([&audit], [&root])?;
    let audit_descriptor_path = out_dir.join("audit_descriptor.bin");
    std::fs::write(&audit_descriptor_path, audit_descriptors.encode_to_vec())?;
    tonic_prost_build::configure()
        .skip_protoc_run()
        .file_descriptor_set_path(&audit_descriptor_path)
        .compile_protos(&[audit], std::slice::from_ref(&root))?;

    // Batch inference (jobs, and the shard tasks of the batch queue).
    let batch = root.join("shamal/batch/v1/batch.proto");
    println!("cargo:rerun-if-changed={}", batch.display());
    let batch_descriptors = protox::compile([&batch], [&root])?;
    let batch_descriptor_path = out_dir.join("batch_descriptor.bin");
    std::fs::write(&batch_descriptor_path, batch_descriptors.encode_to_vec())?;
    tonic_prost_build::configure()
        .skip_protoc_run()
        .file_descriptor_set_path(&batch_descriptor_path)
        .compile_protos(&[batch], std::slice::from_ref(&root))?;
    Ok(())
}
