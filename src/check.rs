//! `spate check`: verifies the machine before serving, and says what to change.
//!
//! Each check is independent and reports OK, WARN (works, but below what production wants) or FAIL
//! (the broker cannot run as configured). The probes are the real operations the broker depends
//! on: an io_uring instance, an O_DIRECT write + fdatasync in the data directory, and the limits
//! that bound locked memory and open files.

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// Locked memory the io_uring rings and glommio's registered buffers want per shard.
pub const WANT_MEMLOCK_BYTES_PER_CORE: u64 = 16 << 20;
/// Open files a broker with many partitions and connections wants (segments, indexes, sockets).
pub const WANT_NOFILE: u64 = 65_536;
/// Direct I/O needs buffers aligned to the device's logical block; 4 KiB covers every common disk.
const DIRECT_IO_ALIGN_BYTES: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Serialize)]
pub struct Finding {
    pub check: &'static str,
    pub status: Status,
    pub detail: String,
    /// What to change, when the status is not OK.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// Runs every check for a broker using `data_dir` on `cores` shards.
pub fn run_checks(data_dir: &Path, cores: usize) -> Vec<Finding> {
    vec![
        check_io_uring(),
        check_direct_io(data_dir),
        check_memlock(cores),
        check_nofile(),
    ]
}

fn check_io_uring() -> Finding {
    let check = "io_uring";
    let disabled = fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(0);
    match io_uring::IoUring::new(8) {
        Ok(ring) => {
            let mut probe = io_uring::Probe::new();
            let probed = ring.submitter().register_probe(&mut probe).is_ok();
            let needed = [
                ("read", io_uring::opcode::Read::CODE),
                ("write", io_uring::opcode::Write::CODE),
                ("fsync", io_uring::opcode::Fsync::CODE),
                ("accept", io_uring::opcode::Accept::CODE),
                ("recv", io_uring::opcode::Recv::CODE),
                ("send", io_uring::opcode::Send::CODE),
            ];
            let missing: Vec<&str> = needed
                .iter()
                .filter(|(_, code)| probed && !probe.is_supported(*code))
                .map(|(name, _)| *name)
                .collect();
            if missing.is_empty() {
                Finding {
                    check,
                    status: Status::Ok,
                    detail: "io_uring instance created; read, write, fsync, accept, recv, send supported"
                        .into(),
                    fix: None,
                }
            } else {
                Finding {
                    check,
                    status: Status::Fail,
                    detail: format!("io_uring lacks opcodes: {}", missing.join(", ")),
                    fix: Some("run a Linux kernel 5.8 or newer".into()),
                }
            }
        }
        Err(e) => Finding {
            check,
            status: Status::Fail,
            detail: format!("cannot create an io_uring instance: {e}"),
            fix: Some(if disabled != 0 {
                format!(
                    "io_uring is disabled by sysctl (kernel.io_uring_disabled = {disabled}): \
                     run `sysctl -w kernel.io_uring_disabled=0`"
                )
            } else {
                "run a Linux kernel 5.8 or newer, and allow io_uring_setup in the container's \
                 seccomp profile"
                    .into()
            }),
        },
    }
}

/// An aligned buffer for O_DIRECT, without an allocator dependency: over-allocate and offset.
fn aligned_block() -> (Vec<u8>, usize) {
    let buf = vec![0x5au8; DIRECT_IO_ALIGN_BYTES * 2];
    let start = buf.as_ptr().align_offset(DIRECT_IO_ALIGN_BYTES);
    (buf, start)
}

fn check_direct_io(data_dir: &Path) -> Finding {
    let check = "direct_io";
    // The data dir may not exist yet: probe the nearest existing ancestor, where it will be made.
    let mut dir: PathBuf = data_dir.to_path_buf();
    while !dir.exists() {
        match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => dir = p.to_path_buf(),
            _ => {
                dir = PathBuf::from(".");
                break;
            }
        }
    }
    let probe = dir.join(format!(".spate-check-{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc_o_direct())
            .open(&probe)?;
        let (buf, start) = aligned_block();
        file.write_all(&buf[start..start + DIRECT_IO_ALIGN_BYTES])?;
        file.sync_data()?;
        Ok(())
    })();
    let _ = fs::remove_file(&probe);
    match result {
        Ok(()) => Finding {
            check,
            status: Status::Ok,
            detail: format!("O_DIRECT write + fdatasync work in {}", dir.display()),
            fix: None,
        },
        Err(e) => Finding {
            check,
            status: Status::Fail,
            detail: format!("O_DIRECT write in {} failed: {e}", dir.display()),
            fix: Some(
                "put the data directory on a filesystem that supports direct I/O (ext4, xfs); \
                 tmpfs and some overlay filesystems do not"
                    .into(),
            ),
        },
    }
}

const fn libc_o_direct() -> i32 {
    // O_DIRECT differs by architecture; these are the kernel's values.
    #[cfg(any(target_arch = "aarch64", target_arch = "arm"))]
    {
        0o200000
    }
    #[cfg(not(any(target_arch = "aarch64", target_arch = "arm")))]
    {
        0o40000
    }
}

/// Soft and hard limits of a resource, from /proc/self/limits (no libc binding needed).
pub fn read_limit(name: &str) -> Option<(Option<u64>, Option<u64>)> {
    let text = fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with(name))?;
    let fields: Vec<&str> = line[name.len()..].split_whitespace().collect();
    let parse = |s: &str| -> Option<u64> { s.parse().ok() };
    let soft = fields.first().and_then(|s| parse(s));
    let hard = fields.get(1).and_then(|s| parse(s));
    Some((soft, hard))
}

fn check_memlock(cores: usize) -> Finding {
    let check = "memlock";
    let want = WANT_MEMLOCK_BYTES_PER_CORE * cores.max(1) as u64;
    match read_limit("Max locked memory") {
        Some((None, _)) => Finding {
            check,
            status: Status::Ok,
            detail: "locked memory is unlimited".into(),
            fix: None,
        },
        Some((Some(soft), _)) if soft >= want => Finding {
            check,
            status: Status::Ok,
            detail: format!("locked memory limit {} KiB", soft / 1024),
            fix: None,
        },
        Some((Some(soft), _)) => Finding {
            check,
            status: Status::Warn,
            detail: format!(
                "locked memory limit {} KiB is below the {} KiB wanted for {} cores; glommio \
                 may fall back to unregistered I/O buffers",
                soft / 1024,
                want / 1024,
                cores
            ),
            fix: Some(
                "raise it: `ulimit -l unlimited` in the service's shell, LimitMEMLOCK=infinity \
                 in its systemd unit, or a memlock line in /etc/security/limits.conf"
                    .into(),
            ),
        },
        None => Finding {
            check,
            status: Status::Warn,
            detail: "cannot read /proc/self/limits".into(),
            fix: Some("mount /proc".into()),
        },
    }
}

fn check_nofile() -> Finding {
    let check = "nofile";
    match read_limit("Max open files") {
        Some((None, _)) => Finding {
            check,
            status: Status::Ok,
            detail: "open files unlimited".into(),
            fix: None,
        },
        Some((Some(soft), _)) if soft >= WANT_NOFILE => Finding {
            check,
            status: Status::Ok,
            detail: format!("open file limit {soft}"),
            fix: None,
        },
        Some((Some(soft), hard)) => Finding {
            check,
            status: Status::Warn,
            detail: format!(
                "open file limit {soft} (hard {}) is below {WANT_NOFILE}: many partitions or \
                 connections will run out of descriptors",
                hard.map_or("unlimited".to_string(), |h| h.to_string())
            ),
            fix: Some(format!(
                "raise it: `ulimit -n {WANT_NOFILE}`, LimitNOFILE={WANT_NOFILE} in the systemd \
                 unit, or a nofile line in /etc/security/limits.conf"
            )),
        },
        None => Finding {
            check,
            status: Status::Warn,
            detail: "cannot read /proc/self/limits".into(),
            fix: Some("mount /proc".into()),
        },
    }
}

/// Renders the findings as a table (or JSON) and returns whether the broker can run.
pub fn report(findings: &[Finding], json: bool) -> (String, bool) {
    let ok = findings.iter().all(|f| f.status != Status::Fail);
    if json {
        let doc = serde_json::json!({ "ok": ok, "checks": findings });
        return (
            serde_json::to_string_pretty(&doc).expect("findings serialize"),
            ok,
        );
    }
    let mut out = String::new();
    for f in findings {
        let status = match f.status {
            Status::Ok => "OK  ",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        };
        out.push_str(&format!("{status}  {:<10} {}\n", f.check, f.detail));
        if let Some(fix) = &f.fix {
            out.push_str(&format!("      {:<10} fix: {fix}\n", ""));
        }
    }
    out.push_str(if ok {
        "the machine can run spate\n"
    } else {
        "spate cannot run here until the FAIL lines are fixed\n"
    });
    (out, ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_io_probe_passes_on_a_real_disk_and_fails_where_it_cannot_write() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let f = check_direct_io(&dir.path().join("not-yet-made"));
        assert_eq!(f.status, Status::Ok, "{f:?}");
        // procfs accepts no new files, so the probe must report a failure with a fix.
        let f = check_direct_io(Path::new("/proc"));
        assert_eq!(f.status, Status::Fail, "{f:?}");
        assert!(f.fix.is_some());
    }

    #[test]
    fn report_fails_when_any_check_fails() {
        let findings = vec![
            Finding {
                check: "a",
                status: Status::Ok,
                detail: "fine".into(),
                fix: None,
            },
            Finding {
                check: "b",
                status: Status::Fail,
                detail: "broken".into(),
                fix: Some("mend it".into()),
            },
        ];
        let (text, ok) = report(&findings, false);
        assert!(!ok);
        assert!(text.contains("FAIL  b"));
        assert!(text.contains("fix: mend it"));
        let (json, ok) = report(&findings, true);
        assert!(!ok);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["checks"][1]["status"], "fail");
    }

    #[test]
    fn limits_parse_from_proc() {
        let (soft, _) = read_limit("Max open files").expect("proc limits readable");
        assert!(soft.is_none_or(|s| s > 0));
    }
}
