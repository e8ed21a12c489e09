//! The collector's parts, as a library so that benches (`benches/ingest.rs`) reach the ingest
//! path without a running server; `main.rs` is the binary that wires them together.
pub mod config_file;
pub mod convert;
pub mod decode;
pub mod forward;
pub mod ingest;
pub mod jaeger;
pub mod query_guard;
pub mod stitch;
pub mod tls;
pub mod ui;
