//! Minimal reader of raw BTF (`/sys/kernel/btf/vmlinux`): just enough to find byte offsets of
//! struct fields, so the probes can follow kernel pointers without CO-RE relocations, which the
//! Rust eBPF toolchain lacks.

use std::path::Path;

use tracer_common::KernelOffsets;

const VMLINUX: &str = "/sys/kernel/btf/vmlinux";
const MAGIC: u16 = 0xeb9f;
const HEADER_LEN: usize = 24;
/// Real chains are a few links long; the bound only stops cycles in corrupt data.
const MAX_DEPTH: u32 = 32;

const KIND_STRUCT: u8 = 4;
const KIND_UNION: u8 = 5;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error(
        "{VMLINUX} not found: this kernel lacks BTF (CONFIG_DEBUG_INFO_BTF), which the agent \
         needs to locate fields of kernel structs"
    )]
    NoKernelBtf,
    #[error("cannot read BTF from {0}: {1}")]
    Io(String, #[source] std::io::Error),
    #[error("malformed BTF: {0}")]
    Malformed(String),
    #[error("struct or union `{0}` not found in BTF")]
    StructNotFound(String),
    #[error("field `{field}` not found in struct `{struct_name}`")]
    FieldNotFound { struct_name: String, field: String },
    #[error("field `{struct_name}.{field}` is a bitfield or not byte-aligned")]
    Bitfield { struct_name: String, field: String },
    #[error(
        "this kernel lays out `{0}` unlike any Linux the probes know (they read its first fields \
         in one go); please report the kernel version"
    )]
    Layout(&'static str),
}

fn malformed<T>(msg: impl Into<String>) -> Result<T, BtfError> {
    Err(BtfError::Malformed(msg.into()))
}

#[derive(Default)]
struct Type {
    name_off: u32,
    kind: u8,
    kind_flag: bool,
    size_or_type: u32,
    /// Of a struct or union: name_off, type id, offset (see `find_member`).
    members: Vec<[u32; 3]>,
}

/// Parsed types (index = type id; 0 is void) and the string table they name into.
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
}

fn u32_at(data: &[u8], pos: usize) -> Result<u32, BtfError> {
    match data.get(pos..pos.saturating_add(4)) {
        Some(b) => Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        None => malformed(format!("truncated at byte {pos}")),
    }
}

impl Btf {
    pub fn from_file(path: &Path) -> Result<Btf, BtfError> {
        let data = std::fs::read(path).map_err(|e| BtfError::Io(path.display().to_string(), e))?;
        Self::from_bytes(&data)
    }

    pub fn from_bytes(data: &[u8]) -> Result<Btf, BtfError> {
        let magic = u32_at(data, 0)? as u16;
        if magic != MAGIC {
            return malformed(format!("bad magic {magic:#06x}, expected {MAGIC:#06x}"));
        }
        if data[2] != 1 {
            return malformed(format!("unsupported version {}", data[2]));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        if hdr_len < HEADER_LEN {
            return malformed(format!("header length {hdr_len} < {HEADER_LEN}"));
        }
        let section = |at: usize, what: &str| -> Result<&[u8], BtfError> {
            let (off, len) = (u32_at(data, at)? as usize, u32_at(data, at + 4)? as usize);
            let start = hdr_len.saturating_add(off);
            match data.get(start..start.saturating_add(len)) {
                Some(s) => Ok(s),
                None => malformed(format!("{what} section ends past the data")),
            }
        };
        let type_data = section(8, "type")?;
        let strings = section(16, "string")?.to_vec();

        let mut types = vec![Type::default()];
        let mut pos = 0;
        while pos < type_data.len() {
            let info = u32_at(type_data, pos + 4)?;
            let (vlen, kind) = ((info & 0xffff) as usize, ((info >> 24) & 0x1f) as u8);
            let mut ty = Type {
                name_off: u32_at(type_data, pos)?,
                kind,
                kind_flag: info >> 31 == 1,
                size_or_type: u32_at(type_data, pos + 8)?,
                ..Type::default()
            };
            pos += 12;
            let id = types.len();
            // Bytes of kind-specific data after these 12, per Documentation/bpf/btf.rst.
            let extra = match kind {
                2 | 7..=12 | 16 | 18 => 0,
                1 | 14 | 17 => 4,
                3 => 12,
                6 | 13 => vlen * 8,
                4 | 5 | 15 | 19 => vlen * 12,
                _ => return malformed(format!("type {id} has unknown kind {kind}")),
            };
            let Some(data) = type_data.get(pos..pos + extra) else {
                return malformed(format!("type {id} runs past the type section"));
            };
            if is_composite(kind) {
                for m in data.chunks_exact(12) {
                    let member = [u32_at(m, 0)?, u32_at(m, 4)?, u32_at(m, 8)?];
                    ty.members.push(member);
                }
            }
            pos += extra;
            types.push(ty);
        }
        Ok(Btf { types, strings })
    }

    /// Byte offset of `field` inside `struct_name` (a struct or union), searching through
    /// anonymous struct/union members recursively (e.g. `sock_common.skc_dport` lives in an
    /// anonymous union/struct). Error if the struct or field is missing or the field is a bitfield.
    pub fn field_offset(&self, struct_name: &str, field: &str) -> Result<u32, BtfError> {
        let names = || (struct_name.to_string(), field.to_string());
        let mut seen_struct = false;
        // Names are not unique (e.g. a driver's private struct); the first with the field wins.
        for ty in &self.types {
            if !is_composite(ty.kind) || !self.name_is(ty.name_off, struct_name) {
                continue;
            }
            seen_struct = true;
            match self.find_member(ty, field, 0)? {
                Some((bits, false)) if bits % 8 == 0 => return Ok(bits / 8),
                Some(_) => {
                    let (struct_name, field) = names();
                    return Err(BtfError::Bitfield { struct_name, field });
                }
                None => {}
            }
        }
        if !seen_struct {
            return Err(BtfError::StructNotFound(struct_name.to_string()));
        }
        let (struct_name, field) = names();
        Err(BtfError::FieldNotFound { struct_name, field })
    }

    /// Bit offset of `field` in `ty`, and whether it is a bitfield. Bitfields are recognised by
    /// `kind_flag` only: pahole has always set it for them in kernel BTF.
    fn find_member(&self, ty: &Type, field: &str, depth: u32) -> Result<Found, BtfError> {
        if depth > MAX_DEPTH {
            return malformed("anonymous members nested too deeply (a type cycle?)");
        }
        for &[name_off, type_id, offset] in &ty.members {
            let (bits, bitfield_size) = match ty.kind_flag {
                true => (offset & 0xff_ffff, offset >> 24),
                false => (offset, 0),
            };
            if name_off != 0 {
                if self.name_is(name_off, field) {
                    return Ok(Some((bits, bitfield_size != 0)));
                }
                continue;
            }
            let inner = self.resolve(type_id)?;
            if !is_composite(inner.kind) {
                continue;
            }
            if let Some((inner_bits, bitfield)) = self.find_member(inner, field, depth + 1)? {
                let Some(total) = bits.checked_add(inner_bits) else {
                    return malformed(format!("offset of `{field}` overflows"));
                };
                return Ok(Some((total, bitfield)));
            }
        }
        Ok(None)
    }

    /// Follows typedefs and qualifiers (typedef, volatile, const, restrict, type_tag).
    fn resolve(&self, mut id: u32) -> Result<&Type, BtfError> {
        for _ in 0..MAX_DEPTH {
            let Some(ty) = self.types.get(id as usize) else {
                return malformed(format!("reference to missing type id {id}"));
            };
            if !matches!(ty.kind, 8..=11 | 18) {
                return Ok(ty);
            }
            id = ty.size_or_type;
        }
        malformed(format!("type chain through id {id} too long (a cycle?)"))
    }

    fn name_is(&self, off: u32, name: &str) -> bool {
        let s = self.strings.get(off as usize..).unwrap_or_default();
        s.starts_with(name.as_bytes()) && s.get(name.len()) == Some(&0)
    }
}

/// A member's bit offset and whether it is a bitfield.
type Found = Option<(u32, bool)>;

fn is_composite(kind: u8) -> bool {
    kind == KIND_STRUCT || kind == KIND_UNION
}

/// Reads /sys/kernel/btf/vmlinux and fills every field of KernelOffsets, with `valid = 1`.
pub fn kernel_offsets() -> Result<KernelOffsets, BtfError> {
    let btf = Btf::from_file(Path::new(VMLINUX)).map_err(|e| match e {
        BtfError::Io(_, e) if e.kind() == std::io::ErrorKind::NotFound => BtfError::NoKernelBtf,
        e => e,
    })?;
    kernel_offsets_from(&btf)
}

pub fn kernel_offsets_from(btf: &Btf) -> Result<KernelOffsets, BtfError> {
    let off = |s: &str, f: &str| btf.field_offset(s, f);
    // The probes hold a `struct sock *`; `sock_common` is embedded in it.
    let common = off("sock", "__sk_common")?;
    let sk = |f: &str| off("sock_common", f).map(|o| o + common);
    let o = KernelOffsets {
        task_pid: off("task_struct", "pid")?,
        task_tgid: off("task_struct", "tgid")?,
        task_files: off("task_struct", "files")?,
        files_fdt: off("files_struct", "fdt")?,
        fdtable_max_fds: off("fdtable", "max_fds")?,
        fdtable_fd: off("fdtable", "fd")?,
        file_inode: off("file", "f_inode")?,
        file_private_data: off("file", "private_data")?,
        inode_mode: off("inode", "i_mode")?,
        socket_type: off("socket", "type")?,
        socket_sk: off("socket", "sk")?,
        sock_family: sk("skc_family")?,
        sock_num: sk("skc_num")?,
        sock_dport: sk("skc_dport")?,
        sock_rcv_saddr: sk("skc_rcv_saddr")?,
        sock_daddr: sk("skc_daddr")?,
        sock_v6_rcv_saddr: sk("skc_v6_rcv_saddr")?,
        sock_v6_daddr: sk("skc_v6_daddr")?,
        sock_net: sk("skc_net")?,
        net_ns_inum: off("net", "ns")? + off("ns_common", "inum")?,
        tcp_write_seq: off("tcp_sock", "write_seq")?,
        tcp_copied_seq: off("tcp_sock", "copied_seq")?,
        task_group_leader: off("task_struct", "group_leader")?,
        task_comm: off("task_struct", "comm")?,
        task_mm: off("task_struct", "mm")?,
        mm_exe_file: off("mm_struct", "exe_file")?,
        file_dentry: off("file", "f_path")? + off("path", "dentry")?,
        dentry_name: off("dentry", "d_name")? + off("qstr", "name")?,
        valid: 1,
        _pad: 0,
    };
    check_heads(&o)?;
    Ok(o)
}

/// The probes read `struct socket`'s `type` and `sk` in one read of its first `SOCKET_HEAD`
/// bytes, and `sock_common`'s IPv4 addresses, ports and family in one of `SOCK_HEAD` bytes from
/// `skc_daddr` (see tracer-ebpf's kernel.rs): true of every Linux since 2.6, checked here.
fn check_heads(o: &KernelOffsets) -> Result<(), BtfError> {
    use tracer_common::{SOCKET_HEAD, SOCK_HEAD};
    let fits = |at: u32, size: usize, head: usize| at as usize + size <= head;
    if !(fits(o.socket_type, 2, SOCKET_HEAD) && fits(o.socket_sk, 8, SOCKET_HEAD)) {
        return Err(BtfError::Layout("struct socket"));
    }
    let sock_fields = [
        (o.sock_family, 2),
        (o.sock_num, 2),
        (o.sock_dport, 2),
        (o.sock_rcv_saddr, 4),
    ];
    let in_head = |&(f, size): &(u32, usize)| {
        f.checked_sub(o.sock_daddr)
            .is_some_and(|rel| fits(rel, size, SOCK_HEAD))
    };
    if !sock_fields.iter().all(in_head) {
        return Err(BtfError::Layout("struct sock_common"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One type: name, kind, kind_flag, size_or_type, members (an INT has one, whose middle
    /// number is its encoding).
    type Spec<'a> = (&'a str, u32, bool, u32, &'a [(&'a str, u32, u32)]);

    /// Raw BTF written by hand, so the tests control every byte.
    fn blob(types: &[Spec]) -> Vec<u8> {
        let mut strings = vec![0u8];
        let mut name = |s: &str| match s {
            "" => 0,
            _ => (strings.len() as u32, strings.extend(s.bytes().chain([0]))).0,
        };
        let mut words = Vec::new();
        for &(n, kind, kind_flag, size, members) in types {
            let vlen = if kind == 1 { 0 } else { members.len() as u32 };
            let info = u32::from(kind_flag) << 31 | kind << 24 | vlen;
            words.extend([name(n), info, size]);
            for &(m, type_id, offset) in members {
                match kind {
                    1 => words.push(type_id),
                    _ => words.extend([name(m), type_id, offset]),
                }
            }
        }
        let tlen = words.len() as u32 * 4;
        let header = [24, 0, tlen, tlen, strings.len() as u32];
        let body = header.iter().chain(&words).flat_map(|w| w.to_le_bytes());
        let magic_version_flags = [0x9f, 0xeb, 1, 0].into_iter();
        magic_version_flags.chain(body).chain(strings).collect()
    }

    fn sample() -> Vec<u8> {
        let outer = &[("x", 1, 0), ("", 3, 32), ("flags", 1, 3 << 24 | 64)];
        blob(&[
            ("int", 1, false, 4, &[("", 32, 0)]),
            // 2: anonymous union, 3: const of it
            ("", 5, false, 4, &[("a", 1, 0), ("b", 1, 0)]),
            ("", 10, false, 2, &[]),
            ("outer", 4, true, 12, outer),
            ("outer", 4, false, 8, &[("late", 1, 32)]),
            // 6: a field 1 bit off the byte grid
            ("odd", 4, false, 8, &[("bit", 1, 1)]),
        ])
    }

    #[test]
    fn finds_fields_through_anonymous_members_and_duplicate_names() {
        let btf = Btf::from_bytes(&sample()).unwrap();
        let off = |f| btf.field_offset("outer", f).unwrap();
        assert_eq!([off("x"), off("a"), off("b"), off("late")], [0, 4, 4, 4]);
    }

    #[test]
    fn errors_name_what_is_missing() {
        let btf = Btf::from_bytes(&sample()).unwrap();
        let err = |s, f| btf.field_offset(s, f).unwrap_err().to_string();
        let e = err("nosuch", "x");
        assert_eq!(e, "struct or union `nosuch` not found in BTF");
        let e = err("outer", "nosuch");
        assert_eq!(e, "field `nosuch` not found in struct `outer`");
        assert!(err("outer", "flags").contains("`outer.flags` is a bitfield"));
        assert!(err("odd", "bit").contains("`odd.bit` is a bitfield or not byte-aligned"));
        // A prefix of a name is not that name.
        assert!(err("oute", "x").contains("`oute` not found"));
        assert!(err("outer", "fla").contains("`fla` not found"));
        let e = BtfError::NoKernelBtf.to_string();
        assert!(e.contains("lacks BTF (CONFIG_DEBUG_INFO_BTF), which the agent needs"));
    }

    #[test]
    fn rejects_malformed_data() {
        let mut data = sample();
        for len in 0..data.len() {
            let result = Btf::from_bytes(&data[..len]);
            assert!(result.is_err(), "accepted {len}-byte prefix");
        }
        let msg = |data: &[u8]| Btf::from_bytes(data).err().unwrap().to_string();
        data[0] = 0;
        let e = msg(&data);
        assert_eq!(e, "malformed BTF: bad magic 0xeb00, expected 0xeb9f");
        data[0] = 0x9f;
        data[24 + 7] = 20; // kind 20 does not exist
        assert_eq!(msg(&data), "malformed BTF: type 1 has unknown kind 20");
    }

    #[test]
    fn running_kernel_offsets() {
        // The machines this project targets all have BTF: its absence is a failure, not a skip.
        let o = kernel_offsets().unwrap();
        println!("{o:#?}");
        assert_eq!(o.valid, 1);
        // Adjacent in `skc_portpair` and `skc_addrpair` on every kernel with BTF.
        assert_eq!(o.sock_num, o.sock_dport + 2);
        assert_eq!(o.sock_rcv_saddr, o.sock_daddr + 4);
        // Only first members sit at 0: fdtable.max_fds, inode.i_mode, sock_common.skc_daddr.
        // (`_pad: 0 }` ends the Debug text, so the filter skips it.)
        let debug = format!("{o:?}");
        let zeros: Vec<_> = debug.split(", ").filter(|f| f.ends_with(": 0")).collect();
        assert_eq!(
            zeros,
            ["fdtable_max_fds: 0", "inode_mode: 0", "sock_daddr: 0"]
        );
        // Where the probes' one-read heads expect them (a kernel that moved them is refused).
        check_heads(&o).unwrap();
        let moved = KernelOffsets {
            sock_family: o.sock_daddr + 24,
            ..o
        };
        let e = check_heads(&moved).unwrap_err().to_string();
        assert!(e.contains("`struct sock_common`"), "{e}");
        let moved = KernelOffsets { socket_sk: 32, ..o };
        assert!(check_heads(&moved)
            .unwrap_err()
            .to_string()
            .contains("`struct socket`"));
        let btf = Btf::from_file(Path::new(VMLINUX)).unwrap();
        let e = btf.field_offset("sock_common", "skc_reuse").unwrap_err();
        assert!(e.to_string().contains("bitfield"), "{e}");
    }
}
