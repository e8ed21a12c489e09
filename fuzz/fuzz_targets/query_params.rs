//! The query API's search parameters (`/api/traces?...`) and trace ids: any text gives a query
//! or an error, never a panic or an overflow.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|raw: &str| {
    let _ = tracer_collector::jaeger::trace_query(raw);
    let _ = tracer_collector::jaeger::parse_trace_id(raw);
    let _ = tracer_collector::jaeger::parse_duration_nanos(raw);
});
