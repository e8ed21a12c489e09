//! Facts about this host and its processes, as OpenTelemetry resource attributes.
//!
//! Host facts are read once; process facts once per process (cached by pid and start time, so a
//! recycled pid is not mistaken for the old process).
use std::{fs, sync::Arc};

use opentelemetry_proto::tonic::{
    common::v1::{any_value::Value, AnyValue, KeyValue},
    resource::v1::Resource,
};

pub fn kv_str(key: &str, value: impl Into<String>) -> KeyValue {
    KeyValue {
        key_strindex: 0,
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(Value::StringValue(value.into())),
        }),
    }
}

pub fn kv_int(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key_strindex: 0,
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(Value::IntValue(value)),
        }),
    }
}

fn kv_str_array(key: &str, values: &[String]) -> KeyValue {
    use opentelemetry_proto::tonic::common::v1::ArrayValue;
    let values = values
        .iter()
        .map(|v| AnyValue {
            value: Some(Value::StringValue(v.clone())),
        })
        .collect();
    KeyValue {
        key_strindex: 0,
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(Value::ArrayValue(ArrayValue { values })),
        }),
    }
}

/// What the agent knows about the machine it runs on.
#[derive(Clone, Debug)]
pub struct HostFacts {
    pub name: String,
    pub id: String,
    pub ips: Vec<String>,
    pub kernel: String,
    pub arch: &'static str,
    pub cpus: i64,
    pub memory_bytes: i64,
}

impl HostFacts {
    pub fn read() -> HostFacts {
        let name = fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        // machine-id is the stable per-host id systemd and the OTel host detector use.
        let id = fs::read_to_string("/etc/machine-id")
            .or_else(|_| fs::read_to_string("/var/lib/dbus/machine-id"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        let memory_kib: i64 = fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
            })
            .unwrap_or(0);
        HostFacts {
            name,
            id,
            ips: host_ips(),
            kernel: crate::probes::kernel_release(),
            arch: match std::env::consts::ARCH {
                "x86_64" => "amd64",
                "aarch64" => "arm64",
                other => other,
            },
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get() as i64),
            memory_bytes: memory_kib * 1024,
        }
    }

    pub fn attributes(&self) -> Vec<KeyValue> {
        vec![
            kv_str("host.name", &self.name),
            kv_str("host.id", &self.id),
            kv_str_array("host.ip", &self.ips),
            kv_str("host.arch", self.arch),
            kv_str("os.type", "linux"),
            kv_str("os.version", &self.kernel),
            kv_int("host.cpu.count", self.cpus),
            kv_int("host.memory.total", self.memory_bytes),
        ]
    }
}

/// The non-loopback addresses of the interfaces of a network namespace (`--netns`): read on a
/// short-lived thread that enters it, so the agent itself stays where it is.
pub fn host_ips_in(netns: &std::path::Path) -> anyhow::Result<Vec<String>> {
    use anyhow::Context as _;
    use std::os::fd::AsRawFd as _;
    let file = fs::File::open(netns)
        .with_context(|| format!("opening the network namespace {}", netns.display()))?;
    std::thread::spawn(move || {
        // SAFETY: setns with an open namespace fd; it changes only this thread.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(host_ips())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("reading the namespace's addresses panicked"))?
    .with_context(|| format!("entering the network namespace {}", netns.display()))
}

/// Non-loopback addresses of the host's interfaces.
fn host_ips() -> Vec<String> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills ifap with a list we free below; we only read it in between.
    unsafe {
        if libc::getifaddrs(&mut ifap) != 0 {
            return out;
        }
        let mut cur = ifap;
        while !cur.is_null() {
            let addr = (*cur).ifa_addr;
            if !addr.is_null() {
                let ip = match i32::from((*addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(addr.cast::<libc::sockaddr_in>());
                        Some(std::net::IpAddr::from(
                            u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                        ))
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(addr.cast::<libc::sockaddr_in6>());
                        Some(std::net::IpAddr::from(sin6.sin6_addr.s6_addr))
                    }
                    _ => None,
                };
                if let Some(ip) = ip.filter(|ip| !ip.is_loopback()) {
                    let s = ip.to_string();
                    if !out.contains(&s) {
                        out.push(s);
                    }
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(ifap);
    }
    out
}

/// What the agent knows about one process.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessFacts {
    pub pid: u32,
    pub executable_name: String,
    pub executable_path: String,
    pub command_line: String,
    pub cgroup: String,
    pub container_id: Option<String>,
    /// `starttime` from /proc/pid/stat: tells a recycled pid from the process we cached.
    pub start_time: u64,
}

/// Words in a command-line argument that suggest its value is a secret.
const SECRET_WORDS: &[&str] = &[
    "password",
    "passwd",
    "secret",
    "token",
    "apikey",
    "api-key",
    "api_key",
    "credential",
    "dsn",
];

/// Whole option names whose value is a secret, where a word match would be too broad
/// (`--pass`, `--pwd`, `--key`, `--auth`).
const SECRET_OPTIONS: &[&str] = &["pass", "pwd", "key", "auth", "private-key", "access-key"];

/// Header names whose value is a credential, in `-H 'Name: value'` or `--header=Name: value`.
const SECRET_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "x-auth-token",
];

fn secret_option(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    let bare = lower.trim_start_matches('-');
    SECRET_WORDS.iter().any(|w| bare.contains(w)) || SECRET_OPTIONS.contains(&bare)
}

/// `user:password@` in a URL (`postgres://app:pw@db/x`) with the password replaced.
fn redact_url_password(arg: &str) -> Option<String> {
    let scheme_end = arg.find("://")? + 3;
    let rest = &arg[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let at = rest[..authority_end].rfind('@')?;
    let colon = rest[..at].find(':')?;
    Some(format!(
        "{}{}:REDACTED{}",
        &arg[..scheme_end],
        &rest[..colon],
        &rest[at..]
    ))
}

/// A header argument (`Authorization: Bearer x`) with a credential's value replaced.
fn redact_header(value: &str) -> Option<String> {
    let (name, _) = value.split_once(':')?;
    SECRET_HEADERS
        .contains(&name.trim().to_ascii_lowercase().as_str())
        .then(|| format!("{}: REDACTED", name.trim()))
}

/// Replaces the secrets in a command line: values of secret-looking options (`--password=x`,
/// `--token x`, `--pass x`, `--dsn=...`), a password glued to its flag (`mysql -pPW`),
/// credential headers (`-H 'Authorization: ...'`, `--header=Cookie: ...`) and the password of
/// `user:password@` URLs. Command lines end up in a trace store that more people can read than
/// the host.
pub fn redact_command_line(args: &[String]) -> String {
    // `-pPASSWORD` is mysql's (and its tools'); elsewhere -p8080 is a port.
    let mysql_like = args.first().is_some_and(|program| {
        let name = program.rsplit('/').next().unwrap_or(program);
        name.starts_with("mysql") || name.starts_with("mariadb")
    });
    let mut out: Vec<String> = Vec::with_capacity(args.len());
    let mut next_is_secret = false;
    let mut next_is_header = false;
    for a in args {
        if next_is_secret {
            out.push("REDACTED".into());
            next_is_secret = false;
            continue;
        }
        if next_is_header {
            next_is_header = false;
            if let Some(redacted) = redact_header(a) {
                out.push(redacted);
                continue;
            }
        }
        if let Some(redacted) = redact_url_password(a) {
            out.push(redacted);
            continue;
        }
        if !a.starts_with('-') {
            match a.split_once('=') {
                // KEY=value, as in environment-style arguments (DB_PASSWORD=x).
                Some((k, _)) if secret_option(k) => out.push(format!("{k}=REDACTED")),
                _ => out.push(a.clone()),
            }
            continue;
        }
        match a.split_once('=') {
            Some((k, v)) if k == "--header" || k == "-H" => match redact_header(v) {
                Some(redacted) => out.push(format!("{k}={redacted}")),
                None => out.push(a.clone()),
            },
            Some((k, _)) if secret_option(k) => out.push(format!("{k}=REDACTED")),
            Some(_) => out.push(a.clone()),
            None if a == "-H" || a == "--header" => {
                out.push(a.clone());
                next_is_header = true;
            }
            // mysql's -pPASSWORD: the password glued to a one-letter flag.
            None if mysql_like && a.len() > 2 && a.starts_with("-p") && !a.starts_with("--") => {
                out.push("-pREDACTED".into());
            }
            None if secret_option(a) => {
                out.push(a.clone());
                next_is_secret = true;
            }
            None => out.push(a.clone()),
        }
    }
    out.join(" ")
}

/// Finds a container id (64 hex characters) in a cgroup path, as Docker, containerd, CRI-O and
/// podman name their cgroups (`/docker/<id>`, `.../cri-containerd-<id>.scope`, `libpod-<id>`).
pub fn container_id_from_cgroup(cgroup: &str) -> Option<String> {
    cgroup
        .split(['/', '-', '.', ':'])
        .find(|part| part.len() == 64 && part.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_owned)
}

/// The process's name, best first: its executable file; argv[0]'s file name; the process's
/// command name (`/proc/PID/comm`, the main thread's); the command name of the thread that made
/// the call, last, since threads name themselves (chromium's network thread is
/// `Chrome_ChildIOT`, which once showed up as a service). `/proc/PID/exe` is unreadable for
/// processes that made themselves non-dumpable (chromium's sandboxed ones).
///
/// A program started through a symbolic link to another one (Debian's `redis-server` is a link
/// to `redis-check-rdb`, which behaves as the name it was started by; busybox's applets) is
/// named by that link: when argv[0]'s name is also the process's command name (which `execve`
/// takes from the path it was given) and the executable's name is not a longer form of it
/// (`python3.11` started as `python`, by a venv's link, stays `python3.11`).
///
/// A process that exited before the agent read /proc is named the same way from what the probes
/// sent with its first connection: the executable's file name (`kernel_exe`) and the command
/// name (`thread_comm`, the main thread's), which stands in for argv[0].
fn executable_name(
    exe_path: &str,
    args: &[String],
    process_comm: &str,
    thread_comm: &str,
    kernel_exe: &str,
) -> String {
    let file_name = |path: &str| {
        path.rsplit('/')
            .next()
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    // argv[0] may carry more than the program ("nginx: worker process").
    let arg0 = args
        .first()
        .and_then(|a0| a0.split_whitespace().next())
        .map(|a0| a0.trim_end_matches(':'))
        .and_then(file_name);
    let exe = file_name(exe_path).or_else(|| file_name(kernel_exe));
    if let (Some(exe), Some(arg0)) = (&exe, &arg0) {
        // The kernel keeps 15 bytes of a command name.
        let comm_matches = !process_comm.is_empty() && arg0.starts_with(process_comm);
        if comm_matches && !exe.starts_with(arg0.as_str()) {
            return arg0.clone();
        }
    }
    let comm = if process_comm.is_empty() {
        thread_comm
    } else {
        process_comm
    };
    if let (Some(exe), None) = (&exe, &arg0) {
        // No argv[0]: the command name, which execve took from the path it was given, tells a
        // link apart the same way.
        if !comm.is_empty() && !exe.starts_with(comm) {
            return comm.to_owned();
        }
    }
    exe.or(arg0)
        .or_else(|| (!process_comm.is_empty()).then(|| process_comm.to_owned()))
        .unwrap_or_else(|| thread_comm.to_owned())
}

fn process_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

impl ProcessFacts {
    /// `names` are what the probes read, used where /proc no longer says (the process is
    /// exiting).
    pub fn read(pid: u32, names: &KernelNames) -> Option<ProcessFacts> {
        let start_time = process_start_time(pid)?;
        let executable_path = fs::read_link(format!("/proc/{pid}/exe"))
            .map(|p| {
                p.to_string_lossy()
                    .trim_end_matches(" (deleted)")
                    .to_owned()
            })
            .unwrap_or_default();
        let args: Vec<String> = fs::read(format!("/proc/{pid}/cmdline"))
            .unwrap_or_default()
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let process_comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let executable_name = executable_name(
            &executable_path,
            &args,
            process_comm.trim(),
            &names.comm(),
            &names.exe(),
        );
        let cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .unwrap_or_default()
            .lines()
            // cgroup v2 line is "0::/path"; with v1 take the first line's path.
            .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
            .unwrap_or_default();
        Some(ProcessFacts {
            pid,
            executable_name,
            executable_path,
            command_line: redact_command_line(&args),
            container_id: container_id_from_cgroup(&cgroup),
            cgroup,
            start_time,
        })
    }

    pub fn attributes(&self, service_name: &str) -> Vec<KeyValue> {
        let mut attrs = vec![
            kv_str("service.name", service_name),
            kv_int("process.pid", i64::from(self.pid)),
            kv_str("process.executable.name", &self.executable_name),
            kv_str("process.executable.path", &self.executable_path),
            kv_str("process.command_line", &self.command_line),
            kv_str("process.linux.cgroup", &self.cgroup),
        ];
        if let Some(id) = &self.container_id {
            attrs.push(kv_str("container.id", id));
        }
        attrs
    }
}

/// What the probes read of a process with its first connection (`ConnRecord`): its command name
/// and its executable's file name, NUL-terminated. They name a process that is gone before the
/// agent can read /proc (curl, short scripts).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelNames {
    pub comm: [u8; 16],
    pub exe: [u8; tracer_common::EXE_NAME_LEN],
}

impl KernelNames {
    /// What a connection record carries.
    pub fn of_record(rec: &tracer_common::ConnRecord) -> KernelNames {
        KernelNames {
            comm: rec.comm,
            exe: rec.exe,
        }
    }

    /// What the probes' connection table keeps (the command name only), for a connection whose
    /// record was lost.
    pub fn of_state(state: &tracer_common::ConnState) -> KernelNames {
        KernelNames {
            comm: state.comm,
            ..KernelNames::default()
        }
    }

    /// Names known without the probes (the agent's own, tests); no executable.
    pub fn comm_only(comm: &str) -> KernelNames {
        let mut names = KernelNames::default();
        let n = comm.len().min(names.comm.len() - 1);
        names.comm[..n].copy_from_slice(&comm.as_bytes()[..n]);
        names
    }

    fn comm(&self) -> String {
        c_string(&self.comm)
    }

    fn exe(&self) -> String {
        c_string(&self.exe)
    }
}

fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Process facts cached by pid, re-read when the pid was recycled.
#[derive(Default)]
pub struct ProcessCache {
    /// FxHash: pids come from the kernel, and SipHash was a measurable share of a new
    /// connection's work.
    by_pid: crate::hashing::FxMap<u32, Arc<ProcessFacts>>,
    /// The pids are another machine's or another time's (`tracer replay`): /proc is never read,
    /// since whatever runs under such a pid here is not the process that was recorded (a
    /// replay under `timeout` once named a recorded curl `timeout`).
    recorded: bool,
}

impl ProcessCache {
    /// For the pids of a recording: processes are named by what the probes read only.
    pub fn recorded() -> ProcessCache {
        ProcessCache {
            recorded: true,
            ..ProcessCache::default()
        }
    }

    /// Facts of `pid`; `names` (what the probes read) stand in for a process that has
    /// already exited.
    pub fn get(&mut self, pid: u32, names: &KernelNames) -> Arc<ProcessFacts> {
        if let Some(p) = self.by_pid.get(&pid) {
            return p.clone();
        }
        let live = if self.recorded {
            None
        } else {
            ProcessFacts::read(pid, names)
        };
        let facts = Arc::new(live.unwrap_or_else(|| {
            let name = executable_name("", &[], "", &names.comm(), &names.exe());
            ProcessFacts {
                pid,
                executable_name: if name.is_empty() {
                    "unknown".into()
                } else {
                    name
                },
                ..Default::default()
            }
        }));
        self.by_pid.insert(pid, facts.clone());
        facts
    }

    /// Forgets processes that have exited (call now and then).
    pub fn prune(&mut self) {
        if self.recorded {
            return;
        }
        self.by_pid
            .retain(|pid, facts| process_start_time(*pid) == Some(facts.start_time));
    }

    pub fn len(&self) -> usize {
        self.by_pid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_pid.is_empty()
    }
}

/// Builds the OTLP resource for a process under a service name.
pub fn resource(host: &HostFacts, process: &ProcessFacts, service_name: &str) -> Resource {
    let mut attributes = process.attributes(service_name);
    attributes.extend(host.attributes());
    Resource {
        attributes,
        dropped_attributes_count: 0,
        entity_refs: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_in_command_lines_are_redacted() {
        let args: Vec<String> = [
            "app",
            "--password=hunter2",
            "--token",
            "abc",
            "--port",
            "80",
            "DB_PASSWORD=x",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            redact_command_line(&args),
            "app --password=REDACTED --token REDACTED --port 80 DB_PASSWORD=REDACTED"
        );
    }

    fn redact(line: &[&str]) -> String {
        redact_command_line(&line.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn secrets_in_urls_flags_and_headers_are_redacted() {
        let cases: &[(&[&str], &str)] = &[
            (
                &[
                    "psql",
                    "postgres://app:s3cret@db:5432/orders?sslmode=require",
                ],
                "psql postgres://app:REDACTED@db:5432/orders?sslmode=require",
            ),
            (
                &["worker", "--broker=amqp://guest:guest@rabbit/"],
                "worker --broker=amqp://guest:REDACTED@rabbit/",
            ),
            (
                &["mysql", "-uroot", "-ps3cret", "shop"],
                "mysql -uroot -pREDACTED shop",
            ),
            (&["/usr/bin/mariadb", "-pX"], "/usr/bin/mariadb -pREDACTED"),
            (&["docker", "run", "-p8080:80"], "docker run -p8080:80"),
            (
                &["app", "--pass", "x", "--pwd", "y"],
                "app --pass REDACTED --pwd REDACTED",
            ),
            (
                &["app", "--key=abc", "--dsn", "x"],
                "app --key=REDACTED --dsn REDACTED",
            ),
            (
                &[
                    "curl",
                    "-H",
                    "Authorization: Bearer abc",
                    "-H",
                    "Accept: */*",
                ],
                "curl -H Authorization: REDACTED -H Accept: */*",
            ),
            (
                &["curl", "--header=Cookie: session=1", "http://u:p@h/"],
                "curl --header=Cookie: REDACTED http://u:REDACTED@h/",
            ),
            (&["nginx", "-g", "daemon off;"], "nginx -g daemon off;"),
            (&["app", "http://host/path@x"], "app http://host/path@x"),
        ];
        for (line, want) in cases {
            assert_eq!(&redact(line), want, "{line:?}");
        }
    }

    #[test]
    fn processes_are_named_by_their_program_not_a_thread() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            executable_name(
                "/usr/sbin/nginx",
                &args(&["nginx: worker process"]),
                "nginx",
                "nginx",
                ""
            ),
            "nginx"
        );
        // /proc/PID/exe unreadable: argv[0], then the process's comm, the thread's last.
        assert_eq!(
            executable_name(
                "",
                &args(&["/usr/lib/chromium/chromium", "--type=utility"]),
                "chromium",
                "Chrome_ChildIOT",
                ""
            ),
            "chromium"
        );
        assert_eq!(
            executable_name("", &args(&["nginx: worker process"]), "", "x", ""),
            "nginx"
        );
        assert_eq!(
            executable_name("", &[], "chromium", "Chrome_ChildIOT", ""),
            "chromium"
        );
        assert_eq!(executable_name("", &[], "", "curl", ""), "curl");
        // Started through a link: the link's name.
        assert_eq!(
            executable_name(
                "/usr/bin/redis-check-rdb",
                &args(&["redis-server 127.0.0.1:6379"]),
                "redis-server",
                "redis-server",
                ""
            ),
            "redis-server"
        );
        assert_eq!(
            executable_name(
                "/usr/bin/busybox",
                &args(&["wget", "-q"]),
                "wget",
                "wget",
                ""
            ),
            "wget"
        );
        // A venv's `python` link to python3.11: the real interpreter's name.
        assert_eq!(
            executable_name(
                "/usr/bin/python3.11",
                &args(&["/srv/.venv/bin/python", "app.py"]),
                "python",
                "python",
                ""
            ),
            "python3.11"
        );
        // Gone before /proc was read: the probes' command name and executable name it the
        // same way (the venv's python, a busybox applet, Debian's redis-server link).
        for (name, comm, exe) in [
            ("python3.11", "python", "python3.11"),
            ("wget", "wget", "busybox"),
            ("redis-server", "redis-server", "redis-check-rdb"),
            ("curl", "curl", "curl"),
            (
                "a-long-program-name",
                "a-long-program-",
                "a-long-program-name",
            ),
        ] {
            assert_eq!(
                executable_name("", &[], "", comm, exe),
                name,
                "{comm} {exe}"
            );
        }
        let mut names = KernelNames::comm_only("python");
        names.exe[..10].copy_from_slice(b"python3.11");
        let mut cache = ProcessCache::default();
        let gone = u32::MAX - 7; // above any pid_max
        assert_eq!(cache.get(gone, &names).executable_name, "python3.11");
        assert_eq!(
            ProcessCache::default()
                .get(gone, &KernelNames::default())
                .executable_name,
            "unknown"
        );
        // A recording's pid is named by the recorded names, whatever runs under that pid here
        // (this test's own pid stands in for a recycled one).
        let me = std::process::id();
        assert_eq!(
            ProcessCache::recorded().get(me, &names).executable_name,
            "python3.11"
        );
        assert_ne!(cache.get(me, &names).executable_name, "python3.11");
    }

    #[test]
    fn container_ids_are_found_in_cgroup_paths() {
        let id = "a".repeat(64);
        assert_eq!(
            container_id_from_cgroup(&format!("/docker/{id}")),
            Some(id.clone())
        );
        assert_eq!(
            container_id_from_cgroup(&format!("/kubepods.slice/cri-containerd-{id}.scope")),
            Some(id)
        );
        assert_eq!(
            container_id_from_cgroup("/user.slice/user-0.slice/session-1.scope"),
            None
        );
    }

    #[test]
    fn own_process_facts_are_read() {
        let me = ProcessFacts::read(std::process::id(), &KernelNames::comm_only("x"))
            .expect("own /proc entry");
        assert!(!me.executable_name.is_empty());
        assert!(me.command_line.contains(&me.executable_name) || !me.command_line.is_empty());
        let host = HostFacts::read();
        assert!(!host.name.is_empty());
        assert!(host.cpus >= 1 && host.memory_bytes > 0);
    }
}
