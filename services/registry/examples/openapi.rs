//! Prints the registry's OpenAPI document (what `GET /openapi.json`
//! serves), e.g. for `scripts/gen-api-docs.py`:
//!
//! ```sh
//! cargo run -q -p shamal-registry --example openapi > docs/openapi.json
//! ```

fn main() -> std::process::ExitCode {
    match shamal_registry::rest::openapi().to_pretty_json() {
        Ok(json) => {
            println!("{json}");
            std::process::ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("cannot serialise the OpenAPI document: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
