//! Which CPUs the shards run on: a `--cpuset` list, or the CPUs this process may run on.

use anyhow::{bail, Context};

/// CPU numbers at and above this are refused before a list is expanded: the width of the
/// kernel's affinity mask as libc gives it (`cpu_set_t`), so a range such as `0-4000000000`
/// cannot allocate.
pub const CPUSET_LIMIT: usize = libc::CPU_SETSIZE as usize;

/// Parses a list such as `1`, `0-3,6` (Linux's cpuset list format) into CPU numbers, in the
/// order given, without repeats.
pub fn parse_cpuset(text: &str) -> anyhow::Result<Vec<usize>> {
    let mut cpus: Vec<usize> = Vec::new();
    for part in text.split(',').map(str::trim) {
        if part.is_empty() {
            bail!("an empty entry; write CPUs as in `0-3,6`");
        }
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (cpu_number(a)?, cpu_number(b)?),
            None => {
                let cpu = cpu_number(part)?;
                (cpu, cpu)
            }
        };
        if first > last {
            bail!("the range {part} runs backwards");
        }
        for cpu in first..=last {
            if !cpus.contains(&cpu) {
                cpus.push(cpu);
            }
        }
    }
    Ok(cpus)
}

fn cpu_number(text: &str) -> anyhow::Result<usize> {
    let cpu: usize = text
        .trim()
        .parse()
        .with_context(|| format!("{text:?} is not a CPU number"))?;
    if cpu >= CPUSET_LIMIT {
        bail!(
            "CPU {cpu} is past the largest this broker can pin to ({})",
            CPUSET_LIMIT - 1
        );
    }
    Ok(cpu)
}

/// The CPUs the calling thread may run on (`taskset`, a cgroup's cpuset), in ascending order.
pub fn allowed_cpus() -> std::io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain bits; sched_getaffinity writes at most its size.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    if unsafe { libc::sched_getaffinity(0, size, &mut set) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((0..CPUSET_LIMIT)
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

/// Keeps the calling thread, and so every thread it starts afterwards, on `cpus`; fails,
/// naming them, if the kernel does not allow one of them (offline, or outside a cgroup's set).
pub fn confine_to(cpus: &[usize]) -> anyhow::Result<()> {
    assert!(!cpus.is_empty(), "an empty cpuset is refused when parsed");
    // SAFETY: as above; every CPU is below CPUSET_LIMIT (checked when parsed).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        assert!(cpu < CPUSET_LIMIT);
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    let size = std::mem::size_of::<libc::cpu_set_t>();
    if unsafe { libc::sched_setaffinity(0, size, &set) } != 0 {
        let e = std::io::Error::last_os_error();
        bail!("the kernel refused CPUs {cpus:?}: {e}");
    }
    // The kernel drops CPUs a cgroup does not allow and fails only when none is left.
    let allowed = allowed_cpus().context("reading back the CPU affinity")?;
    if let Some(cpu) = cpus.iter().find(|c| !allowed.contains(c)) {
        bail!("CPU {cpu} is not available to this process (available: {allowed:?})");
    }
    Ok(())
}

/// The CPUs shard N is pinned to the Nth of (modulo their number): the `--cpuset` list (to
/// which `serve` confined the process at its start), or else the CPUs it may run on.
pub fn shard_cpus(cpuset: Option<&[usize]>) -> anyhow::Result<Vec<usize>> {
    match cpuset {
        Some(cpus) => Ok(cpus.to_vec()),
        None => {
            let cpus = allowed_cpus().context("reading this process's CPU affinity")?;
            if cpus.is_empty() {
                bail!("this process may run on no CPU");
            }
            Ok(cpus)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_ranges_and_their_limits() {
        assert_eq!(parse_cpuset("1").unwrap(), vec![1]);
        assert_eq!(parse_cpuset("0-3,6").unwrap(), vec![0, 1, 2, 3, 6]);
        assert_eq!(parse_cpuset(" 2 , 0-1, 1 ").unwrap(), vec![2, 0, 1]);
        for bad in [
            "",
            "1,",
            "a",
            "-1",
            "3-1",
            "0-",
            "1-2-3",
            "0-4000000000",
            "1024",
        ] {
            let e = parse_cpuset(bad).expect_err(bad).to_string();
            assert!(!e.is_empty(), "{bad}");
        }
        assert!(parse_cpuset("0-4000000000")
            .unwrap_err()
            .to_string()
            .contains("past the largest"));
    }

    #[test]
    fn the_default_is_the_process_affinity() {
        let allowed = allowed_cpus().unwrap();
        assert!(!allowed.is_empty());
        assert_eq!(shard_cpus(None).unwrap(), allowed);
    }
}
