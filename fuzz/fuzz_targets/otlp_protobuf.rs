//! The collector's in-place OTLP protobuf decoder (OTLP/HTTP and gRPC bodies): any bytes give
//! spans or an error, never a panic, and the spans it gives can be listed.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    if let Ok(decoded) = tracer_collector::decode::decode(body) {
        decoded.with_spans(|spans| {
            for s in spans {
                let _ = (s.operation.len(), s.attributes.len(), s.service.len());
            }
        });
    }
});
