//! The web UI in a real browser (Debian's headless chromium driven by playwright-core): search,
//! open a trace, check the waterfall nests the spans correctly, open a span, open the service map.
//! Screenshots are kept in target/ui-artifacts/.
mod support;

use std::process::Command;

use prost::Message as _;
use support::*;

#[tokio::test]
async fn ui_search_waterfall_and_map_in_chromium() {
    let tests_dir = repo_root().join("tracer-collector/ui/tests");
    assert!(
        tests_dir.join("node_modules/playwright-core").exists(),
        "playwright-core missing in {}: run scripts/setup.sh",
        tests_dir.display()
    );
    assert!(
        std::path::Path::new("/usr/bin/chromium").exists(),
        "chromium missing: run scripts/setup.sh"
    );

    let c = Collector::start("ui", &[]);
    // shop-web -> orders-api -> (orders-api's database call): three spans, depth 2, two services.
    let trace = [0x5au8; 16];
    let base = now_nanos() - 5_000_000_000;
    let root = span(trace, 1, None, "GET /checkout", base, 0, 9_000);
    let mut child = span(trace, 2, Some(1), "POST /orders", base, 500, 7_000);
    child.status = Some(opentelemetry_proto::tonic::trace::v1::Status {
        code: 2,
        message: "out of stock".into(),
    });
    let mut db = span(trace, 3, Some(2), "SELECT orders", base, 1_000, 3_000);
    db.kind = 3;
    let client = reqwest::Client::new();
    for (service, spans) in [("shop-web", vec![root]), ("orders-api", vec![db, child])] {
        let resp = client
            .post(c.http_url())
            .header("content-type", "application/x-protobuf")
            .body(request(service, spans).encode_to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }

    let shots = repo_root().join("target/ui-artifacts");
    std::fs::create_dir_all(&shots).unwrap();
    let out = Command::new("node")
        .current_dir(&tests_dir)
        .arg("ui.test.mjs")
        .args(["--url", &c.api("")])
        .args(["--service", "shop-web", "--operation", "GET /checkout"])
        .args(["--expect-spans", "3", "--expect-depth", "2"])
        .arg("--screenshot-dir")
        .arg(&shots)
        .output()
        .expect("node (Node.js 20) is needed for the UI test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the browser test failed:\n{stdout}");
    for png in ["search.png", "trace.png", "map.png"] {
        let meta =
            std::fs::metadata(shots.join(png)).unwrap_or_else(|_| panic!("{png} not written"));
        assert!(meta.len() > 10_000, "{png} looks empty");
    }
}
