//! Generates the Rust types of the event contract from `proto/` at build time, with serde
//! implementations that follow the proto3 JSON mapping (pbjson). protox compiles the schema in
//! Rust, so no `protoc` binary is needed on the build machine.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        "safeclock/v1/referral.proto",
        "safeclock/v1/sla.proto",
        "safeclock/v1/escalation.proto",
        "safeclock/v1/state.proto",
        "safeclock/v1/escalator_state.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", proto_root.join(f).display());
    }

    let descriptors = protox::compile(files, [&proto_root])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join("safeclock_descriptor.bin");
    std::fs::write(
        &descriptor_path,
        prost::Message::encode_to_vec(&descriptors),
    )?;

    prost_build::Config::new()
        .file_descriptor_set_path(&descriptor_path)
        .skip_protoc_run()
        .compile_well_known_types()
        .extern_path(".google.protobuf", "::pbjson_types")
        .enum_attribute(
            ".safeclock.v1.ReferralEvent.kind",
            "#[derive(::strum::IntoStaticStr)] #[strum(serialize_all = \"snake_case\")]",
        )
        .compile_protos(&files, &[&proto_root])?;

    let descriptor_bytes = std::fs::read(&descriptor_path)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptor_bytes)?
        .ignore_unknown_fields()
        .build(&[".safeclock"])?;
    Ok(())
}
