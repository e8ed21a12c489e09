//! `tracer services | operations | traces | trace`: a command-line client of the collector's
//! query API (the Jaeger HTTP API), human-readable by default, `--json` for scripts.
use std::collections::HashMap;

use anyhow::{bail, Context as _};
use serde_json::Value;

/// `println!` for what the collector sent: span names, services, tags and warnings come from
/// anyone who can reach a traced server, and escape sequences in them would reach the terminal
/// (set its title, write the clipboard, clear the screen). Every control character is shown
/// escaped instead.
macro_rules! emit {
    ($($arg:tt)*) => {
        println!("{}", terminal_safe(&format!($($arg)*)))
    };
}

/// `s` with every control character (C0, DEL, C1) written as an escape: `\x1b`, `\u{9b}`.
fn terminal_safe(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            c if (c as u32) < 0x80 && c.is_control() => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

fn emit_json(data: &Value) {
    println!("{}", json_for_terminal(data));
}

/// `data` as one line of JSON fit for a terminal: serde escapes C0 controls but writes C1 ones
/// (U+0080..U+009F) raw, which some terminals take as escape sequences; they are escaped too
/// (`\u009b`), which leaves the JSON value the same.
pub fn json_for_terminal(data: &Value) -> String {
    let text = data.to_string();
    if !text.chars().any(char::is_control) {
        return text;
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

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
    /// The collector's query token (its --query-token), if it requires one.
    #[arg(
        long,
        env = "TRACER_QUERY_TOKEN",
        hide_env_values = true,
        global = true
    )]
    pub query_token: Option<String>,
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

async fn get(c: &ClientArgs, path: &str, query: &[(&str, String)]) -> anyhow::Result<Value> {
    let base = &c.url;
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let mut request = reqwest::Client::new().get(&url).query(query);
    if let Some(token) = &c.query_token {
        request = request.bearer_auth(token);
    }
    let resp = request
        .send()
        .await
        .with_context(|| format!("cannot reach the collector at {base} (is tracer-collector running? set --url or TRACER_URL)"))?;
    let status = resp.status();
    if status == reqwest::StatusCode::UNAUTHORIZED {
        bail!("the collector at {base} wants its query token: set --query-token or TRACER_QUERY_TOKEN");
    }
    if status == reqwest::StatusCode::MISDIRECTED_REQUEST {
        bail!("the collector does not answer for the host name in {base}: use a name it allows (its --allow-host)");
    }
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
        bail!("the collector answered {status}: {}", terminal_safe(&msg));
    }
    Ok(body["data"].clone())
}

/// Prints a JSON array of strings one per line, or as JSON with `--json`.
fn print_list(c: &ClientArgs, data: &Value) {
    if c.json {
        emit_json(data);
        return;
    }
    for s in data.as_array().into_iter().flatten() {
        emit!("{}", s.as_str().unwrap_or_default());
    }
}

pub async fn services(c: &ClientArgs) -> anyhow::Result<()> {
    print_list(c, &get(c, "/api/services", &[]).await?);
    Ok(())
}

pub async fn operations(c: &ClientArgs, service: &str) -> anyhow::Result<()> {
    let path = format!("/api/services/{}/operations", urlencode(service));
    print_list(c, &get(c, &path, &[]).await?);
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
    let data = get(c, "/api/traces", &q).await?;
    if c.json {
        emit_json(&data);
        return Ok(());
    }
    let traces = data.as_array().cloned().unwrap_or_default();
    if traces.is_empty() {
        emit!("no traces match");
        return Ok(());
    }
    emit!(
        "{:<32}  {:<23}  {:>10}  {:>5}  {:>6}  ROOT",
        "TRACE ID",
        "START (UTC)",
        "DURATION",
        "SPANS",
        "ERRORS"
    );
    for t in &traces {
        let s = Summary::of(t);
        emit!(
            "{:<32}  {:<23}  {:>10}  {:>5}  {:>6}  {}{}",
            t["traceID"].as_str().unwrap_or_default(),
            utc(s.start),
            human_micros(s.end - s.start),
            s.spans,
            s.errors,
            s.root,
            if is_incomplete(t) {
                "  [incomplete]"
            } else {
                ""
            }
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

/// The first tag `key` of a span (or process), as Jaeger's JSON lists them.
fn tag<'a>(tags: &'a Value, key: &str) -> Option<&'a Value> {
    tags.as_array()?
        .iter()
        .find(|t| t["key"] == key)
        .map(|t| &t["value"])
}

fn tag_str<'a>(tags: &'a Value, key: &str) -> Option<&'a str> {
    tag(tags, key)?.as_str()
}

/// Integer tags arrive as JSON numbers; strings holding a number are read too (an attribute sent
/// as a string by an SDK).
fn tag_i64(tags: &Value, key: &str) -> Option<i64> {
    let v = tag(tags, key)?;
    v.as_i64().or_else(|| v.as_str()?.trim().parse().ok())
}

/// The collector marks a trace that may miss spans (`incomplete`, with `incompleteReasons`).
fn is_incomplete(trace: &Value) -> bool {
    trace["incomplete"] == true
        || trace["incompleteReasons"]
            .as_array()
            .is_some_and(|r| !r.is_empty())
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

fn host_of<'a>(trace: &'a Value, span: &Value) -> Option<&'a str> {
    let pid = span["processID"].as_str().unwrap_or_default();
    tag_str(&trace["processes"][pid]["tags"], "host.name").filter(|h| !h.is_empty())
}

/// `[tcp-seq/high by collector]`: how the span's parent link was made, from the provenance tags.
/// Spans stored by earlier agents carry only `tracer.link = tcp-connection` (a same-host link by
/// connection) and no `tracer.link.by`, which only the collector adds.
fn link_note(span: &Value) -> Option<String> {
    let tags = &span["tags"];
    let source = tag_str(tags, "tracer.link.source").or_else(|| {
        (tag_str(tags, "tracer.link") == Some("tcp-connection")).then_some("tcp-connection")
    })?;
    let confidence =
        tag_str(tags, "tracer.link.confidence").unwrap_or(if source == "tcp-connection" {
            "high"
        } else {
            "?"
        });
    let by = tag_str(tags, "tracer.link.by").unwrap_or("agent");
    let mut note = format!("[{source}/{confidence} by {by}");
    if let Some(old) = tag_str(tags, "tracer.link.replaced") {
        note.push_str(&format!(", replaced {old}"));
    }
    note.push(']');
    Some(note)
}

/// `[clock +1.50ms, raw start 12:00:00.123456]` on a span whose host's clock was corrected.
fn clock_note(span: &Value) -> Option<String> {
    let tags = &span["tags"];
    let shift = tag_i64(tags, "tracer.clock.shift_us")?;
    let sign = if shift < 0 { "-" } else { "+" };
    let mut note = format!("[clock {sign}{}", human_micros(shift.unsigned_abs()));
    if let Some(raw) =
        tag_i64(tags, "tracer.clock.raw_start_us").and_then(|r| u64::try_from(r).ok())
    {
        note.push_str(&format!(", raw start {}", utc_micros(raw)));
    }
    note.push(']');
    Some(note)
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
        let ids: std::collections::HashSet<&str> =
            spans.iter().filter_map(|s| s["spanID"].as_str()).collect();
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
    let data = get(c, &format!("/api/traces/{}", urlencode(id)), &[]).await?;
    if c.json {
        emit_json(&data);
        return Ok(());
    }
    let t = &data[0];
    let s = Summary::of(t);
    emit!(
        "trace {}  {}  {}  {} spans, {} errors",
        t["traceID"].as_str().unwrap_or_default(),
        utc(s.start),
        human_micros(s.end - s.start),
        s.spans,
        s.errors
    );
    let spans = t["spans"].as_array().cloned().unwrap_or_default();
    let reasons = strings(&t["incompleteReasons"]);
    if is_incomplete(t) {
        emit!("INCOMPLETE: spans may be missing");
        if reasons.is_empty() {
            emit!("  - the collector marked this trace incomplete");
        }
        for r in &reasons {
            emit!("  - {r}");
        }
    }
    let mut shifted_hosts: Vec<&str> = Vec::new();
    let mut shifted = 0;
    for sp in spans
        .iter()
        .filter(|sp| tag(&sp["tags"], "tracer.clock.shift_us").is_some())
    {
        shifted += 1;
        let h = host_of(t, sp).unwrap_or_else(|| service_of(t, sp));
        if !shifted_hosts.contains(&h) {
            shifted_hosts.push(h);
        }
    }
    if shifted > 0 {
        shifted_hosts.sort_unstable();
        emit!(
            "clock correction applied to {shifted} span{} (host{} {})",
            if shifted == 1 { "" } else { "s" },
            if shifted_hosts.len() == 1 { "" } else { "s" },
            shifted_hosts.join(", ")
        );
    }
    let span_warnings: Vec<&str> = spans
        .iter()
        .flat_map(|sp| strings(&sp["warnings"]))
        .collect();
    for w in strings(&t["warnings"]) {
        if !reasons.contains(&w) && !span_warnings.contains(&w) {
            emit!("warning: {w}");
        }
    }
    let hosts: std::collections::HashSet<&str> =
        spans.iter().filter_map(|sp| host_of(t, sp)).collect();
    let show_hosts = hosts.len() > 1;
    let ids: std::collections::HashSet<&str> = spans
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
    let view = TreeView {
        trace: t,
        children: &children,
        t0: s.start,
        show_hosts,
    };
    view.walk();
    Ok(())
}

struct TreeView<'a> {
    trace: &'a Value,
    children: &'a HashMap<Option<String>, Vec<&'a Value>>,
    t0: u64,
    show_hosts: bool,
}

/// Indentation stops growing here: a trace thousands of spans deep would otherwise print lines
/// thousands of columns wide (a 50,000-deep trace once wrote 405 MB).
const MAX_INDENT: usize = 32;

impl TreeView<'_> {
    /// One line a span, children indented under their parent, in start order. Iterative: a
    /// recursive walk overflowed the stack on a trace 50,000 spans deep.
    fn walk(&self) {
        let mut stack: Vec<(&Value, usize)> = self
            .children
            .get(&None)
            .into_iter()
            .flatten()
            .rev()
            .map(|sp| (*sp, 0))
            .collect();
        let mut capped = false;
        while let Some((sp, depth)) = stack.pop() {
            if depth > MAX_INDENT && !capped {
                capped = true;
                emit!("{:>23}(deeper than {MAX_INDENT} levels: the indentation stops growing; each line says its depth)", "");
            }
            self.line(sp, depth);
            let key = sp["spanID"].as_str().map(str::to_owned);
            for child in self.children.get(&key).into_iter().flatten().rev() {
                stack.push((child, depth + 1));
            }
        }
    }

    fn line(&self, sp: &Value, depth: usize) {
        let kind = tag_str(&sp["tags"], "span.kind").unwrap_or("internal");
        let indent = "  ".repeat(depth.min(MAX_INDENT));
        let mut line = format!(
            "{:>10} {:>10}  {indent}{}{}{}: {} [{kind}]",
            format!(
                "+{}",
                human_micros(
                    sp["startTime"]
                        .as_u64()
                        .unwrap_or(self.t0)
                        .saturating_sub(self.t0)
                )
            ),
            human_micros(sp["duration"].as_u64().unwrap_or(0)),
            if depth > MAX_INDENT {
                format!("[{depth}] ")
            } else {
                String::new()
            },
            if is_error(sp) { "! " } else { "" },
            service_of(self.trace, sp),
            sp["operationName"].as_str().unwrap_or_default(),
        );
        if self.show_hosts {
            if let Some(h) = host_of(self.trace, sp) {
                line.push_str(&format!(" @{h}"));
            }
        }
        if let Some(n) = link_note(sp) {
            line.push(' ');
            line.push_str(&n);
        }
        if let Some(n) = clock_note(sp) {
            line.push(' ');
            line.push_str(&n);
        }
        emit!("{line}");
        for w in strings(&sp["warnings"]) {
            if !w.starts_with("clock skew") {
                emit!("{:>23}{indent}  warning: {w}", "");
            }
        }
    }
}

fn human_micros(us: u64) -> String {
    match us {
        0..1_000 => format!("{us}µs"),
        1_000..1_000_000 => format!("{:.2}ms", us as f64 / 1e3),
        _ => format!("{:.3}s", us as f64 / 1e6),
    }
}

/// Unix microseconds as `YYYY-MM-DD HH:MM:SS.uuuuuu` UTC: a raw start differs from the shown one
/// by a clock shift, often under a millisecond.
fn utc_micros(us: u64) -> String {
    let ms = utc(us);
    format!("{ms}{:03}", us % 1000)
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
    fn control_characters_are_escaped() {
        let hostile = "GET /\u{1b}]0;title\u{7}\u{9b}2J\u{7f}x é";
        assert_eq!(
            terminal_safe(hostile),
            "GET /\\x1b]0;title\\x07\\u{9b}2J\\x7fx é"
        );
        assert!(matches!(
            terminal_safe("plain é"),
            std::borrow::Cow::Borrowed(_)
        ));
        let data = serde_json::json!({ "name": hostile });
        let line = json_for_terminal(&data);
        assert!(!line.chars().any(char::is_control), "{line}");
        assert!(line.contains("\\u009b"), "{line}");
        let back: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(back, data, "the escaped JSON is the same value");
    }

    #[test]
    fn times_render_in_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00.000");
        assert_eq!(utc(1_795_645_494_046_399), "2026-11-25 22:24:54.046");
        assert_eq!(human_micros(999), "999µs");
        assert_eq!(human_micros(151_955), "151.96ms");
        assert_eq!(
            utc_micros(1_795_645_494_046_399),
            "2026-11-25 22:24:54.046399"
        );
    }

    #[test]
    fn provenance_and_clock_notes() {
        let span = serde_json::json!({"tags": [
            {"key": "tracer.link.source", "type": "string", "value": "tcp-seq"},
            {"key": "tracer.link.confidence", "type": "string", "value": "high"},
            {"key": "tracer.link.by", "type": "string", "value": "collector"},
            {"key": "tracer.link.replaced", "type": "string", "value": "traceparent:0909090909090909"},
            {"key": "tracer.clock.shift_us", "type": "int64", "value": -1500},
            {"key": "tracer.clock.raw_start_us", "type": "int64", "value": 1_795_645_494_046_399_u64},
        ]});
        assert_eq!(
            link_note(&span).unwrap(),
            "[tcp-seq/high by collector, replaced traceparent:0909090909090909]"
        );
        assert_eq!(
            clock_note(&span).unwrap(),
            "[clock -1.50ms, raw start 2026-11-25 22:24:54.046399]"
        );
        let agent = serde_json::json!({"tags": [
            {"key": "tracer.link.source", "type": "string", "value": "thread"},
            {"key": "tracer.link.confidence", "type": "string", "value": "medium"},
        ]});
        assert_eq!(link_note(&agent).unwrap(), "[thread/medium by agent]");
        assert_eq!(clock_note(&agent), None);
        let old = serde_json::json!({"tags": [{"key": "tracer.link", "value": "tcp-connection"}]});
        assert_eq!(link_note(&old).unwrap(), "[tcp-connection/high by agent]");
        assert_eq!(link_note(&serde_json::json!({"tags": []})), None);
    }
}
