//! TLS and token on ingest: an https collector with a certificate from a test CA accepts spans
//! from a client trusting that CA and presenting the token, refuses the rest, and the agent
//! exports to it (see end_to_end.rs, which runs over TLS).
mod support;

use prost::Message as _;
use support::*;

#[tokio::test]
async fn ingest_over_tls_requires_the_ca_and_the_token() {
    let certs = temp_dir("tls-certs");
    make_certs(&certs);
    let cert = certs.join("server.pem");
    let key = certs.join("server.key");
    let c = Collector::start(
        "tls",
        &[
            "--token",
            "tls-token",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let url = format!("https://127.0.0.1:{}/v1/traces", c.http_port);
    let trace = [0x77u8; 16];
    let body = request(
        "tls-svc",
        vec![span(trace, 1, None, "secure", now_nanos(), 0, 10)],
    )
    .encode_to_vec();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(certs.join("ca.pem")).unwrap()).unwrap();
    let trusting = reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()
        .unwrap();

    // A client that does not trust the CA cannot connect.
    let err = reqwest::Client::new()
        .post(&url)
        .header("content-type", "application/x-protobuf")
        .body(body.clone())
        .send()
        .await;
    assert!(
        err.is_err(),
        "an untrusted certificate must fail the handshake"
    );
    // Plain HTTP to the TLS port gets no OTLP answer.
    let plain = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{}/v1/traces", c.http_port))
        .body(body.clone())
        .send()
        .await;
    assert!(plain.map(|r| !r.status().is_success()).unwrap_or(true));
    // Trusted, without and with the token.
    let resp = trusting
        .post(&url)
        .header("content-type", "application/x-protobuf")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = trusting
        .post(&url)
        .header("content-type", "application/x-protobuf")
        .header("authorization", "Bearer tls-token")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.version(),
        reqwest::Version::HTTP_2,
        "ALPN offers h2 for gRPC clients"
    );
    let (st, _) = c.get(&format!("/api/traces/{}", hex::encode(trace))).await;
    assert_eq!(st, 200);
}
