//! Recordings of ring-buffer records (`tracer agent --record`), which `tracer replay` reads:
//! a header (a magic string and the record layout), then each record after its length.
use anyhow::Context as _;

/// `--record`: a new file only its owner can read (records carry payload prefixes). Never an
/// existing path: the agent runs privileged, and a file or symlink planted there would have it
/// write where the planter chose, or keep the planter's permissions on what it writes.
pub fn create_recording(
    path: &std::path::Path,
) -> anyhow::Result<std::io::BufWriter<std::fs::File>> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => anyhow::anyhow!(
                "{} already exists: --record writes a new file only (remove it, or choose another path)",
                path.display()
            ),
            _ => anyhow::Error::new(e)
                .context(format!("creating the recording {}", path.display())),
        })?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    write_header(&mut out).with_context(|| format!("writing the recording {}", path.display()))?;
    Ok(out)
}

/// What a recording starts with: a magic string, then `RECORD_LAYOUT` (u32, little-endian).
pub(crate) const MAGIC: &[u8; 8] = b"tracerec";

pub(crate) fn write_header(out: &mut impl std::io::Write) -> std::io::Result<()> {
    out.write_all(MAGIC)?;
    out.write_all(&tracer_common::RECORD_LAYOUT.to_le_bytes())
}

/// The records of a recording, after its header; an error says why the file is not one this
/// agent can replay.
pub(crate) fn body_of(data: &[u8]) -> anyhow::Result<&[u8]> {
    let Some(rest) = data.strip_prefix(MAGIC) else {
        anyhow::bail!("not a recording made by `tracer agent --record` (no header)");
    };
    let Some((layout, rest)) = rest.split_first_chunk::<4>() else {
        anyhow::bail!("the recording ends inside its header");
    };
    let layout = u32::from_le_bytes(*layout);
    if layout != tracer_common::RECORD_LAYOUT {
        anyhow::bail!(
            "recorded with record layout {layout}, this agent reads layout {}: record again \
             with this version (`tracer agent --record FILE`)",
            tracer_common::RECORD_LAYOUT
        );
    }
    Ok(rest)
}

/// After the header, a recording is the records back to back, each after its length (u32,
/// little-endian).
pub fn write_record(out: &mut impl std::io::Write, record: &[u8]) -> std::io::Result<()> {
    out.write_all(&(record.len() as u32).to_le_bytes())?;
    out.write_all(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--record` makes a new 0600 file, and refuses a path that exists, as a file or as a
    /// symlink planted there (even a dangling one).
    #[test]
    fn recordings_are_new_private_files() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("tracer-record-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let fresh = dir.join("fresh.rec");
        drop(create_recording(&fresh).unwrap());
        let mode = std::fs::metadata(&fresh).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = create_recording(&fresh).unwrap_err().to_string();
        assert!(again.contains("already exists"), "{again}");
        let target = dir.join("elsewhere");
        let link = dir.join("link.rec");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(
            create_recording(&link).is_err(),
            "a planted symlink is followed"
        );
        assert!(!target.exists(), "the symlink's target was created");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
