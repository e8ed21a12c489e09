//! `tracer services | operations | traces | trace`: a command-line client of the collector's
//! query API (the Jaeger HTTP API), human-readable by default, `--json` for scripts.
use std::collections::HashMap;

use anyhow::{bail, Context as _};
use serde_json::Value;

#[derive(clap::Args, Debug)]
pub struct ClientArgs {
    /// Collector query API base URL.
    #[arg(
        long,
        env = "TRACER_URL",
        default_value = "http://127.0.0.1:16686",
        global = true
    )]
    pub url: String,
    /// Print the API's JSON `data` instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct TracesArgs {
    /// Service whose spans to search.
    #[arg(long, short)]
    pub service: Option<String>,
    /// Span name (operation), e.g. "GET /users/{id}".
    #[arg(long, short)]
    pub operation: Option<String>,
    /// `key=value` on span or resource attributes (repeatable), e.g. http.response.status_code=500.
    #[arg(long = "tag", short = 't', value_name = "KEY=VALUE")]
    pub tags: Vec<String>,
    /// Shortest trace span to match, e.g. 10ms.
    #[arg(long)]
    pub min_duration: Option<String>,
    /// Longest, e.g. 2s.
    #[arg(long)]
    pub max_duration: Option<String>,
    /// How far back to look, e.g. 15m, 1h, 24h.
    #[arg(long, default_value = "1h")]
    pub lookback: String,
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
}

async fn get(base: &str, path: &str, query: &[(&str, String)]) -> anyhow::Result<Value> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let resp = reqwest::Client::new()
        .get(&url)
        .query(query)
        .send()
        .await
        .with_context(|| format!("cannot reach the collector at {base} (is tracer-collector running? set --url or TRACER_URL)"))?;
    let status = resp.status();
    let text = resp
        .text()
        .await
        .with_context(|| format!("reading the answer of {url}"))?;
    let body: Value =
        serde_json::from_str(&text).with_context(|| format!("{url} did not answer JSON"))?;
    if !status.is_success() {
        let msg = body["errors"][0]["msg"]
            .as_str()
            .unwrap_or("no message")
            .to_owned();
        bail!("the collector answered {status}: {msg}");
    }
    Ok(body["data"].clone())
}

/// Prints a JSON array of strings one per line, or as JSON with `--json`.
fn print_list(c: &ClientArgs, data: &Value) {
    if c.json {
        println!("{data}");
        return;
    }
    for s in data.as_array().into_iter().flatten() {
        println!("{}", s.as_str().unwrap_or_default());
    }
}

pub async fn services(c: &ClientArgs) -> anyhow::Result<()> {
    print_list(c, &get(&c.url, "/api/services", &[]).await?);
    Ok(())
}

pub async fn operations(c: &ClientArgs, service: &str) -> anyhow::Result<()> {
    let path = format!("/api/services/{}/operations", urlencode(service));
    print_list(c, &get(&c.url, &path, &[]).await?);
    Ok(())
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub async fn traces(c: &ClientArgs, a: &TracesArgs) -> anyhow::Result<()> {
    let mut q: Vec<(&str, String)> = vec![
        ("lookback", a.lookback.clone()),
        ("limit", a.limit.to_string()),
    ];
    if let Some(s) = &a.service {
        q.push(("service", s.clone()));
    }
    if let Some(o) = &a.operation {
        q.push(("operation", o.clone()));
    }
    if let Some(d) = &a.min_duration {
        q.push(("minDuration", d.clone()));
    }
    if let Some(d) = &a.max_duration {
        q.push(("maxDuration", d.clone()));
    }
    if !a.tags.is_empty() {
        let mut map = serde_json::Map::new();
        for t in &a.tags {
            let (k, v) = t
                .split_once('=')
                .with_context(|| format!("--tag {t:?} is not key=value"))?;
            map.insert(k.to_owned(), Value::from(v));
        }
        q.push(("tags", Value::Object(map).to_string()));
    }
    let data = get(&c.url, "/api/traces", &q).await?;
    if c.json {
        println!("{data}");
        return Ok(());
    }
    let traces = data.as_array().cloned().unwrap_or_default();
    if traces.is_empty() {
        println!("no traces match");
        return Ok(());
    }
    println!(
        "{:<32}  {:<23}  {:>10}  {:>5}  {:>6}  ROOT",
        "TRACE ID", "START (UTC)", "DURATION", "SPANS", "ERRORS"
    );
    for t in &traces {
        let s = Summary::of(t);
        println!(
            "{:<32}  {:<23}  {:>10}  {:>5}  {:>6}  {}",
            t["traceID"].as_str().unwrap_or_default(),
            utc(s.start),
            human_micros(s.end - s.start),
            s.spans,
            s.errors,
            s.root
        );
    }
    Ok(())
}

struct Summary {
    start: u64,
    end: u64,
    spans: usize,
    errors: usize,
    root: String,
}

fn is_error(span: &Value) -> bool {
    span["tags"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|t| t["key"] == "error" && t["value"] == true)
}

fn service_of<'a>(trace: &'a Value, span: &Value) -> &'a str {
    let pid = span["processID"].as_str().unwrap_or_default();
    trace["processes"][pid]["serviceName"]
        .as_str()
        .unwrap_or("?")
}

impl Summary {
    fn of(t: &Value) -> Summary {
        let spans = t["spans"].as_array().cloned().unwrap_or_default();
        let start = spans
            .iter()
            .filter_map(|s| s["startTime"].as_u64())
            .min()
            .unwrap_or(0);
        let end = spans
            .iter()
            .filter_map(|s| Some(s["startTime"].as_u64()? + s["duration"].as_u64()?))
            .max()
            .unwrap_or(start);
        let ids: Vec<&str> = spans.iter().filter_map(|s| s["spanID"].as_str()).collect();
        let root = spans
            .iter()
            .filter(|s| {
                !s["references"].as_array().into_iter().flatten().any(|r| {
                    r["refType"] == "CHILD_OF"
                        && ids.contains(&r["spanID"].as_str().unwrap_or_default())
                })
            })
            .min_by_key(|s| s["startTime"].as_u64().unwrap_or(0))
            .map(|s| {
                format!(
                    "{}: {}",
                    service_of(t, s),
                    s["operationName"].as_str().unwrap_or_default()
                )
            })
            .unwrap_or_default();
        Summary {
            start,
            end,
            spans: spans.len(),
            errors: spans.iter().filter(|s| is_error(s)).count(),
            root,
        }
    }
}

pub async fn trace(c: &ClientArgs, id: &str) -> anyhow::Result<()> {
    let data = get(&c.url, &format!("/api/traces/{}", urlencode(id)), &[]).await?;
    if c.json {
        println!("{data}");
        return Ok(());
    }
    let t = &data[0];
    let s = Summary::of(t);
    println!(
        "trace {}  {}  {}  {} spans, {} errors",
        t["traceID"].as_str().unwrap_or_default(),
        utc(s.start),
        human_micros(s.end - s.start),
        s.spans,
        s.errors
    );
    let spans = t["spans"].as_array().cloned().unwrap_or_default();
    let ids: Vec<&str> = spans
        .iter()
        .filter_map(|sp| sp["spanID"].as_str())
        .collect();
    let parent_of = |sp: &Value| -> Option<String> {
        sp["references"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|r| {
                let p = r["spanID"].as_str()?;
                (r["refType"] == "CHILD_OF" && ids.contains(&p)).then(|| p.to_owned())
            })
    };
    let mut children: HashMap<Option<String>, Vec<&Value>> = HashMap::new();
    for sp in &spans {
        children.entry(parent_of(sp)).or_default().push(sp);
    }
    for list in children.values_mut() {
        list.sort_by_key(|sp| sp["startTime"].as_u64().unwrap_or(0));
    }
    fn walk(
        t: &Value,
        children: &HashMap<Option<String>, Vec<&Value>>,
        key: Option<String>,
        depth: usize,
        t0: u64,
    ) {
        for sp in children.get(&key).into_iter().flatten() {
            let kind = sp["tags"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|t| t["key"] == "span.kind")
                .and_then(|t| t["value"].as_str())
                .unwrap_or("internal");
            println!(
                "{:>10} {:>10}  {}{}{}: {} [{kind}]",
                format!(
                    "+{}",
                    human_micros(sp["startTime"].as_u64().unwrap_or(t0) - t0)
                ),
                human_micros(sp["duration"].as_u64().unwrap_or(0)),
                "  ".repeat(depth),
                if is_error(sp) { "! " } else { "" },
                service_of(t, sp),
                sp["operationName"].as_str().unwrap_or_default(),
            );
            walk(
                t,
                children,
                sp["spanID"].as_str().map(str::to_owned),
                depth + 1,
                t0,
            );
        }
    }
    walk(t, &children, None, 0, s.start);
    Ok(())
}

fn human_micros(us: u64) -> String {
    match us {
        0..1_000 => format!("{us}µs"),
        1_000..1_000_000 => format!("{:.2}ms", us as f64 / 1e3),
        _ => format!("{:.3}s", us as f64 / 1e6),
    }
}

/// Unix microseconds as `YYYY-MM-DD HH:MM:SS.mmm` UTC (civil-from-days, no time zone database).
fn utc(us: u64) -> String {
    let secs = us / 1_000_000;
    let (days, rem) = ((secs / 86400) as i64, secs % 86400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        us % 1_000_000 / 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_render_in_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00.000");
        assert_eq!(utc(1_795_645_494_046_399), "2026-11-25 22:24:54.046");
        assert_eq!(human_micros(999), "999µs");
        assert_eq!(human_micros(151_955), "151.96ms");
    }
}
