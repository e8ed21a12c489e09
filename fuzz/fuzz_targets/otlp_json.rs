//! OTLP/JSON bodies as the collector reads them: serde into the OTLP structs, then the same
//! checks and conversion as every span; any bytes give spans or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;

fuzz_target!(|body: &[u8]| {
    if let Ok(request) = serde_json::from_slice::<ExportTraceServiceRequest>(body) {
        let _ = tracer_collector::convert::spans_from_request(request);
    }
});
