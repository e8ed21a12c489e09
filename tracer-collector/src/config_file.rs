//! `--config FILE`: the collector's settings from a TOML file, for the packaged service
//! (`/etc/tracer/collector.toml`). Each key is a flag's long name (`_` or `-` alike); a flag
//! that takes no value takes `true`, a repeatable one an array. The file's settings become flags
//! placed before the command line's, so a flag given on the command line wins; a setting whose
//! environment variable is set is left out, so the order is the agent's: flag, environment, file,
//! default. Built on the command's own definition, a new flag is a valid key with no change here.
use std::{ffi::OsString, path::PathBuf};

use anyhow::{bail, Context as _};

/// `args` (the program name first) with the settings of the file named by `--config` inserted
/// after the program name. Without `--config`, `args` unchanged.
pub fn expand(args: Vec<OsString>, command: &clap::Command) -> anyhow::Result<Vec<OsString>> {
    let Some(path) = config_path(&args) else {
        return Ok(args);
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading the config file {}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("the config file {} is not valid TOML", path.display()))?;
    let mut flags = Vec::new();
    for (key, value) in &table {
        let long = key.replace('_', "-");
        let Some(arg) = command
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()) && long != "config")
        else {
            bail!(
                "the config file {} has an unknown setting {key:?}: the settings are the flags of \
                 `{} --help`, without the dashes",
                path.display(),
                command.get_name()
            );
        };
        if arg
            .get_env()
            .is_some_and(|name| std::env::var_os(name).is_some())
        {
            continue;
        }
        let takes_value = arg.get_action().takes_values();
        let values = match value {
            toml::Value::Array(items) => items.iter().collect(),
            v => vec![v],
        };
        for v in values {
            let text = match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) if !takes_value => {
                    if *b {
                        flags.push(OsString::from(format!("--{long}")));
                    }
                    continue;
                }
                other => bail!(
                    "the config file {}: {key} = {other} is not a value for --{long}",
                    path.display()
                ),
            };
            if !takes_value {
                bail!(
                    "the config file {}: --{long} takes no value; write {key} = true",
                    path.display()
                );
            }
            flags.push(OsString::from(format!("--{long}={text}")));
        }
    }
    let mut out = Vec::with_capacity(args.len() + flags.len());
    let mut rest = args.into_iter();
    out.extend(rest.next());
    out.extend(flags);
    out.extend(rest);
    Ok(out)
}

/// The value of `--config FILE` or `--config=FILE`, if given.
fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut iter = args.iter().skip(1);
    while let Some(arg) = iter.next() {
        let text = arg.to_str()?;
        if text == "--" {
            return None;
        }
        if text == "--config" {
            return iter.next().map(PathBuf::from);
        }
        if let Some(path) = text.strip_prefix("--config=") {
            return Some(PathBuf::from(path));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction, Command};

    fn command() -> Command {
        Command::new("c")
            .arg(Arg::new("config").long("config"))
            .arg(Arg::new("data_dir").long("data-dir"))
            .arg(Arg::new("retention_mib").long("retention-mib"))
            .arg(Arg::new("fsync").long("fsync").action(ArgAction::SetTrue))
            .arg(
                Arg::new("allow_host")
                    .long("allow-host")
                    .action(ArgAction::Append),
            )
    }

    fn expand_with(file: &str, cli: &[&str]) -> anyhow::Result<Vec<String>> {
        let dir = std::env::temp_dir().join(format!("config-file-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{}.toml", file.len()));
        std::fs::write(&path, file).unwrap();
        let mut args = vec![OsString::from("c"), "--config".into(), path.into()];
        args.extend(cli.iter().map(OsString::from));
        Ok(expand(args, &command())?
            .into_iter()
            .skip(1)
            .map(|a| a.into_string().unwrap())
            .filter(|a| !a.starts_with("--config") && !a.ends_with(".toml"))
            .collect())
    }

    #[test]
    fn settings_become_flags_before_the_command_line() {
        let flags = expand_with(
            "data_dir = \"/var/lib/x\"\nretention-mib = 512\nfsync = true\nallow_host = [\"a\", \"b\"]\n",
            &["--retention-mib", "64"],
        )
        .unwrap();
        assert_eq!(
            flags,
            [
                "--allow-host=a",
                "--allow-host=b",
                "--data-dir=/var/lib/x",
                "--fsync",
                "--retention-mib=512",
                "--retention-mib",
                "64"
            ]
        );
        // The command line's value comes last: with args_override_self, it wins.
        let m = command()
            .args_override_self(true)
            .try_get_matches_from(["c"].into_iter().chain(flags.iter().map(String::as_str)))
            .unwrap();
        assert_eq!(m.get_one::<String>("retention_mib").unwrap(), "64");
    }

    #[test]
    fn bad_files_are_explained() {
        let unknown = expand_with("retention_days = 3\n", &[]).unwrap_err();
        assert!(format!("{unknown:#}").contains("unknown setting \"retention_days\""));
        let table = expand_with("[data_dir]\nx = 1\n", &[]).unwrap_err();
        assert!(format!("{table:#}").contains("is not a value for --data-dir"));
        let flag_value = expand_with("fsync = \"yes\"\n", &[]).unwrap_err();
        assert!(format!("{flag_value:#}").contains("takes no value"));
        let syntax = expand_with("data_dir = \n", &[]).unwrap_err();
        assert!(format!("{syntax:#}").contains("is not valid TOML"));
        let missing = expand(
            vec!["c".into(), "--config".into(), "/no/such/file.toml".into()],
            &command(),
        )
        .unwrap_err();
        assert!(format!("{missing:#}").contains("reading the config file /no/such/file.toml"));
    }

    #[test]
    fn without_config_the_arguments_are_unchanged() {
        let args: Vec<OsString> = vec!["c".into(), "--data-dir".into(), "x".into()];
        assert_eq!(expand(args.clone(), &command()).unwrap(), args);
    }
}
