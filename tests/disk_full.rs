//! A full disk stays local: the broker runs on a small ext4 filesystem the test makes (a loop
//! mount), one partition is filled through Produce (acks=all) until KAFKA_STORAGE_ERROR, and
//! then another topic's partition still reads, a topic delete succeeds, writes resume once the
//! delete has freed space (no restart), and every acknowledged record is read back with nothing
//! unacknowledged visible: the high watermark and the fetched records equal the acks counted,
//! also after a restart. Needs root and loop devices (CI has both); otherwise says why and
//! returns.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;

use common::{assert_success, record_batch, spate_cli, Broker, Raw};

/// Small enough to fill in seconds, large enough for a few 16 MiB test segments.
const IMAGE_BYTES: u64 = 64 << 20;
/// Records per produced batch (about 750 KB each, under the default batch limit).
const RECORDS_PER_BATCH: i32 = 50_000;
/// Produce requests allowed for filling the disk (64 MiB is about 90 of them).
const MAX_FILL_REQUESTS: usize = 1_000;
const KAFKA_STORAGE_ERROR: i16 = 56;
const RESUME_TIMEOUT: Duration = Duration::from_secs(20);

/// The loop-mounted filesystem; unmounted (which also detaches its loop device) on drop.
struct Mount {
    point: PathBuf,
    mounted: bool,
}

impl Mount {
    fn unmount(&mut self) {
        if !std::mem::replace(&mut self.mounted, false) {
            return;
        }
        let ok = Command::new("umount")
            .arg(&self.point)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Something still holds it: detach lazily so no mount outlives the test.
            let _ = Command::new("umount").arg("-l").arg(&self.point).status();
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// The broker on the small filesystem: on drop the broker is killed first, then the
/// filesystem unmounted, then the image removed.
struct Setup {
    broker: Broker,
    mount: Mount,
    _image_dir: tempfile::TempDir,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.broker.kill();
        self.mount.unmount();
    }
}

fn run(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Mounts a fresh ext4 image of `IMAGE_BYTES` at `point`, or says why it cannot.
fn mount_image(image_dir: &Path, point: &Path) -> Result<Mount, String> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map_err(|e| format!("id: {e}"))?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Err("not root".into());
    }
    let image = image_dir.join("disk.img");
    let img = image.to_str().expect("UTF-8 path");
    run("truncate", &["-s", &IMAGE_BYTES.to_string(), img])?;
    run("mkfs.ext4", &["-q", "-F", img])?;
    std::fs::create_dir_all(point).map_err(|e| e.to_string())?;
    run(
        "mount",
        &["-o", "loop", img, point.to_str().expect("UTF-8 path")],
    )?;
    Ok(Mount {
        point: point.to_path_buf(),
        mounted: true,
    })
}

fn name(s: &str) -> TopicName {
    TopicName(StrBytes::from_string(s.to_string()))
}

/// One batch to partition 0 of `topic` with acks=all; the partition's error code.
fn produce(raw: &mut Raw, topic: &str, batch: &[u8]) -> i16 {
    let mut pd = PartitionProduceData::default();
    pd.index = 0;
    pd.records = Some(Bytes::from(batch.to_vec()));
    let mut td = TopicProduceData::default();
    td.name = name(topic);
    td.partition_data = vec![pd];
    let mut req = ProduceRequest::default();
    req.acks = -1;
    req.timeout_ms = 30_000;
    req.topic_data = vec![td];
    let resp = raw.call(7, &req);
    resp.responses[0].partition_responses[0].error_code
}

/// Reads partition 0 of `topic` to its end: (records, high watermark). Offsets must be
/// contiguous from 0.
fn read_all(raw: &mut Raw, topic: &str) -> (i64, i64) {
    let mut next = 0i64;
    let mut hwm;
    for _ in 0..10_000 {
        let req = common::fetch_request(topic, 0, next);
        let resp = raw.call(11, &req);
        let pd = &resp.responses[0].partitions[0];
        assert_eq!(pd.error_code, 0, "fetch {topic} at {next}");
        hwm = pd.high_watermark;
        let records = pd.records.clone().unwrap_or_default();
        if records.is_empty() {
            return (next, hwm);
        }
        let mut rest = &records[..];
        while rest.len() >= 61 {
            let len = i32::from_be_bytes(rest[8..12].try_into().unwrap()) as usize + 12;
            if len > rest.len() {
                break; // a partial batch at the end of a fetch
            }
            let base = i64::from_be_bytes(rest[..8].try_into().unwrap());
            let count = i32::from_be_bytes(rest[57..61].try_into().unwrap()) as i64;
            assert_eq!(base, next, "{topic}: offsets are contiguous");
            next += count;
            rest = &rest[len..];
        }
    }
    panic!("{topic}: fetch did not reach the end");
}

fn create_topic(broker: &Broker, topic: &str) {
    let out = spate_cli(
        &broker.addr(),
        &["topic", "create", topic, "--partitions", "1"],
    );
    assert_success("topic create", &out);
}

#[test]
fn a_full_disk_fails_only_the_writes_that_need_space() {
    let mut broker = Broker::start();
    broker.terminate();
    let image_dir = tempfile::tempdir().expect("tempdir");
    let data = broker.data_dir();
    // The first start wrote its files there: the filesystem gets a fresh data dir.
    std::fs::rename(&data, broker.dir.path().join("data.first")).expect("move data dir aside");
    let mount = match mount_image(image_dir.path(), &data) {
        Ok(m) => m,
        Err(why) => {
            eprintln!("skipping the disk-full test: {why}");
            return;
        }
    };
    let mut s = Setup {
        broker,
        mount,
        _image_dir: image_dir,
    };
    s.broker.spawn();
    for t in ["keep", "fill", "spare"] {
        create_topic(&s.broker, t);
    }
    let batch = record_batch(-1, 0, 0, RECORDS_PER_BATCH);
    let per_batch = RECORDS_PER_BATCH as i64;
    let mut raw = Raw::connect(&s.broker.addr());
    let (mut keep_acked, mut fill_acked) = (0i64, 0i64);
    for topic in ["keep", "spare"] {
        assert_eq!(produce(&mut raw, topic, &batch), 0, "{topic}");
    }
    keep_acked += per_batch;

    // Fill the disk through one partition until the broker says it is full.
    let mut full = false;
    for _ in 0..MAX_FILL_REQUESTS {
        match produce(&mut raw, "fill", &batch) {
            0 => fill_acked += per_batch,
            KAFKA_STORAGE_ERROR => {
                full = true;
                break;
            }
            code => panic!("unexpected error code {code} while filling"),
        }
    }
    assert!(full, "the disk never filled");
    assert!(
        fill_acked > 0,
        "something was written before the disk filled"
    );
    // A second try fails the same way, and changes nothing.
    assert_eq!(produce(&mut raw, "fill", &batch), KAFKA_STORAGE_ERROR);

    // Nothing unacknowledged is visible, and the other partition still reads.
    assert_eq!(read_all(&mut raw, "fill"), (fill_acked, fill_acked));
    assert_eq!(read_all(&mut raw, "keep"), (keep_acked, keep_acked));
    // Writes to a partition with space reserved may still succeed: counted, never required.
    match produce(&mut raw, "keep", &batch) {
        0 => keep_acked += per_batch,
        KAFKA_STORAGE_ERROR => {}
        code => panic!("unexpected error code {code} on another partition"),
    }
    assert_eq!(read_all(&mut raw, "keep"), (keep_acked, keep_acked));

    // Deleting a topic works on the full disk, and frees its space.
    let out = spate_cli(&s.broker.addr(), &["topic", "delete", "spare"]);
    assert_success("topic delete on a full disk", &out);

    // Writes resume without a restart (polled: nothing else is waited for).
    let deadline = Instant::now() + RESUME_TIMEOUT;
    loop {
        match produce(&mut raw, "fill", &batch) {
            0 => {
                fill_acked += per_batch;
                break;
            }
            KAFKA_STORAGE_ERROR => {
                assert!(Instant::now() < deadline, "writes did not resume");
                std::thread::sleep(Duration::from_millis(100));
            }
            code => panic!("unexpected error code {code} after freeing space"),
        }
    }
    assert_eq!(read_all(&mut raw, "fill"), (fill_acked, fill_acked));
    assert_eq!(read_all(&mut raw, "keep"), (keep_acked, keep_acked));

    let log = s.broker.log();
    assert!(log.contains("out of disk space"), "a log line for ENOSPC");
    assert!(
        !log.contains("partition log failed"),
        "no partition log failed:\n{log}"
    );

    // The same after a restart.
    drop(raw);
    s.broker.terminate();
    s.broker.spawn();
    let mut raw = Raw::connect(&s.broker.addr());
    assert_eq!(read_all(&mut raw, "fill"), (fill_acked, fill_acked));
    assert_eq!(read_all(&mut raw, "keep"), (keep_acked, keep_acked));
    let out = spate_cli(&s.broker.addr(), &["topic", "list"]);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("spare"),
        "the deleted topic stays deleted"
    );
}
