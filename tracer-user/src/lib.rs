//! The agent's modules: the `tracer` binary (`main.rs`) is their command line. A library so
//! that the protocol parsers and the pipeline can be tested, fuzzed and benchmarked without
//! root or probes.
pub mod agent;
pub mod btf;
pub mod client;
pub mod context;
pub mod doctor;
pub mod export;
pub mod hashing;
pub mod kernel_red;
pub mod link;
pub mod loss;
pub mod metrics;
pub mod pairing;
pub mod pipeline;
pub mod priority;
pub mod probes;
pub mod protocol;
pub mod recording;
pub mod records;
pub mod red;
pub mod replay;
pub mod resource;
pub mod ring;
pub mod settings;
pub mod spans;
pub mod stats;
pub mod tls;
pub mod wire;
