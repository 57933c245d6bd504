//! Kafka's topic configs: every config Kafka documents for topics, with its type, default and
//! validation, and whether Spate implements it; typed parsing with clear errors, and the
//! IncrementalAlterConfigs operations (SET, DELETE, APPEND, SUBTRACT) and the legacy
//! AlterConfigs replace-all as pure functions over a topic's overrides.
//!
//! A config Spate does not implement is refused with a message saying so, never as "unknown",
//! except when it is set to Kafka's default value: that changes nothing, and tools that write
//! every default out explicitly must be able to create topics. Every refusal maps to Kafka's
//! INVALID_CONFIG. The table is docs/topic-configs.md (kept equal by a test).

use std::collections::BTreeMap;
use std::fmt;

use crate::clean::{
    CompactionPolicy, DEFAULT_DELETE_RETENTION_MS, DEFAULT_MAX_COMPACTION_LAG_MS,
    DEFAULT_MIN_CLEANABLE_DIRTY_RATIO, DEFAULT_MIN_COMPACTION_LAG_MS,
};

/// The type of a config's value, as Kafka's `ConfigDef.Type` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigType {
    Boolean,
    String,
    Int,
    Long,
    Double,
    List,
}

impl fmt::Display for ConfigType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConfigType::Boolean => "boolean",
            ConfigType::String => "string",
            ConfigType::Int => "int",
            ConfigType::Long => "long",
            ConfigType::Double => "double",
            ConfigType::List => "list",
        })
    }
}

/// A parsed, validated value.
#[derive(Clone, Debug, PartialEq)]
pub enum ConfigValue {
    Boolean(bool),
    String(String),
    Int(i32),
    Long(i64),
    Double(f64),
    List(Vec<String>),
}

impl fmt::Display for ConfigValue {
    /// Kafka's string form (what DescribeConfigs returns).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigValue::Boolean(b) => write!(f, "{b}"),
            ConfigValue::String(s) => f.write_str(s),
            ConfigValue::Int(i) => write!(f, "{i}"),
            ConfigValue::Long(l) => write!(f, "{l}"),
            ConfigValue::Double(d) => write!(f, "{d:?}"),
            ConfigValue::List(l) => f.write_str(&l.join(",")),
        }
    }
}

/// A default, const-constructible.
#[derive(Clone, Copy, Debug)]
pub enum DefaultValue {
    Boolean(bool),
    String(&'static str),
    Int(i32),
    Long(i64),
    Double(f64),
    List(&'static [&'static str]),
}

impl DefaultValue {
    pub fn value(&self) -> ConfigValue {
        match *self {
            DefaultValue::Boolean(b) => ConfigValue::Boolean(b),
            DefaultValue::String(s) => ConfigValue::String(s.to_owned()),
            DefaultValue::Int(i) => ConfigValue::Int(i),
            DefaultValue::Long(l) => ConfigValue::Long(l),
            DefaultValue::Double(d) => ConfigValue::Double(d),
            DefaultValue::List(l) => ConfigValue::List(l.iter().map(|s| (*s).to_owned()).collect()),
        }
    }
}

/// What values a config accepts beyond its type.
#[derive(Clone, Copy, Debug)]
pub enum Valid {
    Any,
    /// Integer at least this.
    AtLeast(i64),
    /// Integer in this closed range.
    Between(i64, i64),
    /// Integer in this closed range, or exactly -1 (Kafka's "unset" for a codec level).
    BetweenOrMinusOne(i64, i64),
    /// Double in this closed range.
    DoubleBetween(f64, f64),
    /// One of these strings (case-sensitive, as Kafka's `ValidString`).
    OneOf(&'static [&'static str]),
    /// A list whose every element is one of these (Kafka's `ValidList`).
    ListOf(&'static [&'static str]),
    /// A throttled-replicas list: `*`, or `partition:broker` pairs.
    ThrottledReplicas,
}

/// Whether Spate implements a config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Support {
    /// The setting takes effect.
    Implemented,
    /// Accepted with any valid value and ignored, as Kafka itself ignores it now.
    Ignored,
    /// Refused unless set to Kafka's default (which is what Spate does).
    NotImplemented,
}

/// One topic config as Kafka documents it.
#[derive(Clone, Copy, Debug)]
pub struct ConfigDef {
    pub name: &'static str,
    pub ty: ConfigType,
    pub default: DefaultValue,
    pub valid: Valid,
    pub support: Support,
    /// What Spate does with it (for the docs table).
    pub note: &'static str,
}

/// Why a topic config was refused: all map to Kafka's INVALID_CONFIG.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TopicConfigError {
    #[error("unknown topic config {0}")]
    Unknown(String),
    #[error("Spate does not implement the topic config {name} (it behaves as Kafka's default, {default})")]
    NotImplemented { name: String, default: String },
    #[error("invalid value {value:?} for topic config {name}: {reason}")]
    InvalidValue {
        name: String,
        value: String,
        reason: String,
    },
    #[error("{op} applies to list configs only; {name} is a {ty}")]
    NotAList {
        op: &'static str,
        name: String,
        ty: ConfigType,
    },
    #[error("{op} of topic config {name} needs a value")]
    MissingValue { op: &'static str, name: String },
}

const I64_MAX: i64 = i64::MAX;

/// Every topic-level config of Kafka (4.x, plus the ones 4.0 removed that older clients still
/// send), in Kafka's documentation order.
pub const TOPIC_CONFIGS: &[ConfigDef] = &[
    ConfigDef {
        name: "cleanup.policy",
        ty: ConfigType::List,
        default: DefaultValue::List(&["delete"]),
        valid: Valid::ListOf(&["compact", "delete"]),
        support: Support::Implemented,
        note: "delete (retention), compact (the log cleaner), or both",
    },
    ConfigDef {
        name: "compression.gzip.level",
        ty: ConfigType::Int,
        default: DefaultValue::Int(-1),
        valid: Valid::BetweenOrMinusOne(1, 9),
        support: Support::NotImplemented,
        note: "Spate never recompresses produced batches",
    },
    ConfigDef {
        name: "compression.lz4.level",
        ty: ConfigType::Int,
        default: DefaultValue::Int(9),
        valid: Valid::Between(1, 17),
        support: Support::NotImplemented,
        note: "Spate never recompresses produced batches",
    },
    ConfigDef {
        name: "compression.type",
        ty: ConfigType::String,
        default: DefaultValue::String("producer"),
        valid: Valid::OneOf(&["uncompressed", "zstd", "lz4", "snappy", "gzip", "producer"]),
        support: Support::NotImplemented,
        note: "only `producer`: batches are stored as the producer compressed them",
    },
    ConfigDef {
        name: "compression.zstd.level",
        ty: ConfigType::Int,
        default: DefaultValue::Int(3),
        valid: Valid::Between(-131_072, 22),
        support: Support::NotImplemented,
        note: "Spate never recompresses produced batches",
    },
    ConfigDef {
        name: "delete.retention.ms",
        ty: ConfigType::Long,
        default: DefaultValue::Long(DEFAULT_DELETE_RETENTION_MS as i64),
        valid: Valid::AtLeast(0),
        support: Support::Implemented,
        note: "tombstones are kept this long after their segment was first cleaned",
    },
    ConfigDef {
        name: "file.delete.delay.ms",
        ty: ConfigType::Long,
        default: DefaultValue::Long(60_000),
        valid: Valid::AtLeast(0),
        support: Support::NotImplemented,
        note: "segments are deleted at once (open readers keep their file handles)",
    },
    ConfigDef {
        name: "flush.messages",
        ty: ConfigType::Long,
        default: DefaultValue::Long(I64_MAX),
        valid: Valid::AtLeast(1),
        support: Support::NotImplemented,
        note: "the flush policy is the broker's (group commit by default)",
    },
    ConfigDef {
        name: "flush.ms",
        ty: ConfigType::Long,
        default: DefaultValue::Long(I64_MAX),
        valid: Valid::AtLeast(0),
        support: Support::NotImplemented,
        note: "the flush policy is the broker's (group commit by default)",
    },
    ConfigDef {
        name: "follower.replication.throttled.replicas",
        ty: ConfigType::List,
        default: DefaultValue::List(&[]),
        valid: Valid::ThrottledReplicas,
        support: Support::NotImplemented,
        note: "no replication throttling",
    },
    ConfigDef {
        name: "index.interval.bytes",
        ty: ConfigType::Int,
        default: DefaultValue::Int(4096),
        valid: Valid::AtLeast(1),
        support: Support::Implemented,
        note: "at least 1 (Kafka also takes 0, an entry per batch: 1 does the same)",
    },
    ConfigDef {
        name: "leader.replication.throttled.replicas",
        ty: ConfigType::List,
        default: DefaultValue::List(&[]),
        valid: Valid::ThrottledReplicas,
        support: Support::NotImplemented,
        note: "no replication throttling",
    },
    ConfigDef {
        name: "local.retention.bytes",
        ty: ConfigType::Long,
        default: DefaultValue::Long(-2),
        valid: Valid::AtLeast(-2),
        support: Support::NotImplemented,
        note: "no tiered storage",
    },
    ConfigDef {
        name: "local.retention.ms",
        ty: ConfigType::Long,
        default: DefaultValue::Long(-2),
        valid: Valid::AtLeast(-2),
        support: Support::NotImplemented,
        note: "no tiered storage",
    },
    ConfigDef {
        name: "max.compaction.lag.ms",
        ty: ConfigType::Long,
        default: DefaultValue::Long(DEFAULT_MAX_COMPACTION_LAG_MS as i64),
        valid: Valid::AtLeast(1),
        support: Support::Implemented,
        note: "a dirty segment older than this is cleaned whatever the dirty ratio",
    },
    ConfigDef {
        name: "max.message.bytes",
        ty: ConfigType::Int,
        default: DefaultValue::Int(1_048_588),
        valid: Valid::Between(
            crate::batch::BATCH_HEADER_BYTES as i64,
            crate::MAX_FRAME_PAYLOAD_BYTES as i64,
        ),
        support: Support::Implemented,
        note: "largest batch; Spate's ceiling is 64 MiB",
    },
    ConfigDef {
        name: "message.downconversion.enable",
        ty: ConfigType::Boolean,
        default: DefaultValue::Boolean(true),
        valid: Valid::Any,
        support: Support::Ignored,
        note: "a no-op in Kafka 4 too: only record format v2 exists",
    },
    ConfigDef {
        name: "message.format.version",
        ty: ConfigType::String,
        default: DefaultValue::String("3.0-IV1"),
        valid: Valid::Any,
        support: Support::Ignored,
        note: "removed in Kafka 4.0; Spate stores only record format v2",
    },
    ConfigDef {
        name: "message.timestamp.after.max.ms",
        ty: ConfigType::Long,
        default: DefaultValue::Long(3_600_000),
        valid: Valid::AtLeast(0),
        support: Support::Implemented,
        note: "a record stamped further ahead of the broker's clock is refused",
    },
    ConfigDef {
        name: "message.timestamp.before.max.ms",
        ty: ConfigType::Long,
        default: DefaultValue::Long(I64_MAX),
        valid: Valid::AtLeast(0),
        support: Support::Implemented,
        note: "a record stamped further behind the broker's clock is refused",
    },
    ConfigDef {
        name: "message.timestamp.difference.max.ms",
        ty: ConfigType::Long,
        default: DefaultValue::Long(I64_MAX),
        valid: Valid::AtLeast(0),
        support: Support::NotImplemented,
        note: "removed in Kafka 4.0: use message.timestamp.before/after.max.ms",
    },
    ConfigDef {
        name: "message.timestamp.type",
        ty: ConfigType::String,
        default: DefaultValue::String("CreateTime"),
        valid: Valid::OneOf(&["CreateTime", "LogAppendTime"]),
        support: Support::Implemented,
        note: "LogAppendTime rewrites the batch header (attributes, max timestamp, CRC)",
    },
    ConfigDef {
        name: "min.cleanable.dirty.ratio",
        ty: ConfigType::Double,
        default: DefaultValue::Double(DEFAULT_MIN_CLEANABLE_DIRTY_RATIO),
        valid: Valid::DoubleBetween(0.0, 1.0),
        support: Support::Implemented,
        note: "the cleaner skips a log less dirty than this",
    },
    ConfigDef {
        name: "min.compaction.lag.ms",
        ty: ConfigType::Long,
        default: DefaultValue::Long(DEFAULT_MIN_COMPACTION_LAG_MS as i64),
        valid: Valid::AtLeast(0),
        support: Support::Implemented,
        note: "segments with records newer than this are not cleaned",
    },
    ConfigDef {
        name: "min.insync.replicas",
        ty: ConfigType::Int,
        default: DefaultValue::Int(1),
        valid: Valid::AtLeast(1),
        support: Support::NotImplemented,
        note: "single replica until replication is wired in",
    },
    ConfigDef {
        name: "preallocate",
        ty: ConfigType::Boolean,
        default: DefaultValue::Boolean(false),
        valid: Valid::Any,
        support: Support::NotImplemented,
        note: "Spate always reserves space ahead of the writes (16 MiB at a time)",
    },
    ConfigDef {
        name: "remote.log.copy.disable",
        ty: ConfigType::Boolean,
        default: DefaultValue::Boolean(false),
        valid: Valid::Any,
        support: Support::NotImplemented,
        note: "no tiered storage",
    },
    ConfigDef {
        name: "remote.log.delete.on.disable",
        ty: ConfigType::Boolean,
        default: DefaultValue::Boolean(false),
        valid: Valid::Any,
        support: Support::NotImplemented,
        note: "no tiered storage",
    },
    ConfigDef {
        name: "remote.storage.enable",
        ty: ConfigType::Boolean,
        default: DefaultValue::Boolean(false),
        valid: Valid::Any,
        support: Support::NotImplemented,
        note: "no tiered storage",
    },
    ConfigDef {
        name: "retention.bytes",
        ty: ConfigType::Long,
        default: DefaultValue::Long(-1),
        valid: Valid::Any,
        support: Support::Implemented,
        note: "-1 (or any negative): no size limit",
    },
    ConfigDef {
        name: "retention.ms",
        ty: ConfigType::Long,
        default: DefaultValue::Long(604_800_000),
        valid: Valid::AtLeast(-1),
        support: Support::Implemented,
        note: "-1: no time limit",
    },
    ConfigDef {
        name: "segment.bytes",
        ty: ConfigType::Int,
        default: DefaultValue::Int(1_073_741_824),
        valid: Valid::AtLeast(crate::recovery::MIN_SEGMENT_BYTES as i64),
        support: Support::Implemented,
        note: "at least 64 KiB (Kafka 4 asks for 1 MiB)",
    },
    ConfigDef {
        name: "segment.index.bytes",
        ty: ConfigType::Int,
        default: DefaultValue::Int(10_485_760),
        valid: Valid::AtLeast(4),
        support: Support::NotImplemented,
        note: "Spate's sparse indexes grow with the segment, no fixed size",
    },
    ConfigDef {
        name: "segment.jitter.ms",
        ty: ConfigType::Long,
        default: DefaultValue::Long(0),
        valid: Valid::AtLeast(0),
        support: Support::NotImplemented,
        note: "no jitter on age-based rolls",
    },
    ConfigDef {
        name: "segment.ms",
        ty: ConfigType::Long,
        default: DefaultValue::Long(604_800_000),
        valid: Valid::AtLeast(1),
        support: Support::Implemented,
        note: "a segment rolls when its first batch is older than this",
    },
    ConfigDef {
        name: "unclean.leader.election.enable",
        ty: ConfigType::Boolean,
        default: DefaultValue::Boolean(false),
        valid: Valid::Any,
        support: Support::NotImplemented,
        note: "never an unclean election",
    },
];

/// The definition of a topic config, if Kafka has one by that name.
pub fn lookup(name: &str) -> Option<&'static ConfigDef> {
    TOPIC_CONFIGS.iter().find(|d| d.name == name)
}

fn def_of(name: &str) -> Result<&'static ConfigDef, TopicConfigError> {
    lookup(name).ok_or_else(|| TopicConfigError::Unknown(name.to_owned()))
}

impl ConfigDef {
    /// Parses and validates `raw` as this config's type (Kafka trims values; booleans are
    /// case-insensitive; a list is comma-separated, empty for "").
    pub fn parse(&self, raw: &str) -> Result<ConfigValue, TopicConfigError> {
        let bad = |reason: String| TopicConfigError::InvalidValue {
            name: self.name.to_owned(),
            value: raw.to_owned(),
            reason,
        };
        let s = raw.trim();
        let value = match self.ty {
            ConfigType::Boolean => match s.to_ascii_lowercase().as_str() {
                "true" => ConfigValue::Boolean(true),
                "false" => ConfigValue::Boolean(false),
                _ => return Err(bad("expected true or false".into())),
            },
            ConfigType::String => ConfigValue::String(s.to_owned()),
            ConfigType::Int => ConfigValue::Int(
                s.parse()
                    .map_err(|e| bad(format!("not a 32-bit integer ({e})")))?,
            ),
            ConfigType::Long => ConfigValue::Long(
                s.parse()
                    .map_err(|e| bad(format!("not a 64-bit integer ({e})")))?,
            ),
            ConfigType::Double => {
                let d: f64 = s.parse().map_err(|e| bad(format!("not a number ({e})")))?;
                if !d.is_finite() {
                    return Err(bad("not a finite number".into()));
                }
                ConfigValue::Double(d)
            }
            ConfigType::List => ConfigValue::List(parse_list(s)),
        };
        self.validate(&value).map_err(bad)?;
        Ok(value)
    }

    fn validate(&self, value: &ConfigValue) -> Result<(), String> {
        let int = match value {
            ConfigValue::Int(i) => Some(i64::from(*i)),
            ConfigValue::Long(l) => Some(*l),
            _ => None,
        };
        match (self.valid, value) {
            (Valid::Any, _) => Ok(()),
            (Valid::AtLeast(min), _) => match int {
                Some(v) if v >= min => Ok(()),
                _ => Err(format!("must be at least {min}")),
            },
            (Valid::Between(lo, hi), _) => match int {
                Some(v) if (lo..=hi).contains(&v) => Ok(()),
                _ => Err(format!("must be in [{lo}, {hi}]")),
            },
            (Valid::BetweenOrMinusOne(lo, hi), _) => match int {
                Some(v) if v == -1 || (lo..=hi).contains(&v) => Ok(()),
                _ => Err(format!("must be in [{lo}, {hi}] or -1")),
            },
            (Valid::DoubleBetween(lo, hi), ConfigValue::Double(d)) if (lo..=hi).contains(d) => {
                Ok(())
            }
            (Valid::DoubleBetween(lo, hi), _) => Err(format!("must be in [{lo}, {hi}]")),
            (Valid::OneOf(allowed), ConfigValue::String(s)) if allowed.contains(&s.as_str()) => {
                Ok(())
            }
            (Valid::OneOf(allowed), _) => Err(format!("must be one of {}", allowed.join(", "))),
            (Valid::ListOf(allowed), ConfigValue::List(items)) => {
                match items.iter().find(|i| !allowed.contains(&i.as_str())) {
                    None => Ok(()),
                    Some(i) => Err(format!("{i:?} is not one of {}", allowed.join(", "))),
                }
            }
            (Valid::ListOf(_), _) => Err("must be a list".into()),
            (Valid::ThrottledReplicas, ConfigValue::List(items)) => {
                let pair = |i: &String| {
                    i.split_once(':').is_some_and(|(p, b)| {
                        p.trim().parse::<u32>().is_ok() && b.trim().parse::<u32>().is_ok()
                    })
                };
                if items.len() == 1 && items[0] == "*" || items.iter().all(pair) {
                    Ok(())
                } else {
                    Err("must be * or a list of partition:broker pairs".into())
                }
            }
            (Valid::ThrottledReplicas, _) => Err("must be a list".into()),
        }
    }

    /// [`Self::parse`], then refused if Spate does not implement the config and the value is
    /// not Kafka's default.
    pub fn parse_supported(&self, raw: &str) -> Result<ConfigValue, TopicConfigError> {
        let value = self.parse(raw)?;
        if self.support == Support::NotImplemented && value != self.default.value() {
            return Err(TopicConfigError::NotImplemented {
                name: self.name.to_owned(),
                default: self.default.value().to_string(),
            });
        }
        Ok(value)
    }
}

fn parse_list(s: &str) -> Vec<String> {
    if s.is_empty() {
        return Vec::new();
    }
    s.split(',').map(|i| i.trim().to_owned()).collect()
}

/// An IncrementalAlterConfigs operation (its `config_operation` codes are 0..=3 in this order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlterOp {
    Set,
    Delete,
    Append,
    Subtract,
}

impl AlterOp {
    /// From the protocol's operation code.
    pub fn from_code(code: i8) -> Option<AlterOp> {
        Some(match code {
            0 => AlterOp::Set,
            1 => AlterOp::Delete,
            2 => AlterOp::Append,
            3 => AlterOp::Subtract,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            AlterOp::Set => "SET",
            AlterOp::Delete => "DELETE",
            AlterOp::Append => "APPEND",
            AlterOp::Subtract => "SUBTRACT",
        }
    }
}

/// APPEND: the current list (or the default when unset) followed by the new items it does not
/// hold yet. Kafka's semantics.
pub fn list_append(current: &[String], items: &[String]) -> Vec<String> {
    let mut out = current.to_vec();
    for i in items {
        if !out.contains(i) {
            out.push(i.clone());
        }
    }
    out
}

/// SUBTRACT: the current list without any of `items`.
pub fn list_subtract(current: &[String], items: &[String]) -> Vec<String> {
    current
        .iter()
        .filter(|i| !items.contains(i))
        .cloned()
        .collect()
}

/// Where a described value comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigSource {
    /// Set on the topic (Kafka's DYNAMIC_TOPIC_CONFIG).
    Topic,
    /// Kafka's default (DEFAULT_CONFIG).
    Default,
}

#[derive(Clone, Debug, PartialEq)]
pub struct DescribedConfig {
    pub name: &'static str,
    pub value: String,
    pub source: ConfigSource,
    pub ty: ConfigType,
}

/// The cleanup policy a topic's `cleanup.policy` list gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CleanupPolicy {
    pub delete: bool,
    pub compact: bool,
}

/// A topic's config overrides: everything not set has Kafka's default.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TopicConfigs {
    overrides: BTreeMap<&'static str, ConfigValue>,
}

impl TopicConfigs {
    /// The overrides of a CreateTopics request, or of a legacy AlterConfigs (which replaces
    /// every override of the topic by these). A name given twice: the last value counts.
    pub fn from_pairs<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<TopicConfigs, TopicConfigError> {
        let mut overrides = BTreeMap::new();
        for (name, raw) in pairs {
            let def = def_of(name)?;
            overrides.insert(def.name, def.parse_supported(raw)?);
        }
        Ok(TopicConfigs { overrides })
    }

    /// IncrementalAlterConfigs: applies every operation or none (the result is a new value).
    pub fn alter<'a>(
        &self,
        ops: impl IntoIterator<Item = (&'a str, AlterOp, Option<&'a str>)>,
    ) -> Result<TopicConfigs, TopicConfigError> {
        let mut next = self.clone();
        for (name, op, raw) in ops {
            let def = def_of(name)?;
            let need = |raw: Option<&'a str>| {
                raw.ok_or(TopicConfigError::MissingValue {
                    op: op.name(),
                    name: name.to_owned(),
                })
            };
            match op {
                AlterOp::Set => {
                    next.overrides
                        .insert(def.name, def.parse_supported(need(raw)?)?);
                }
                AlterOp::Delete => {
                    next.overrides.remove(def.name);
                }
                AlterOp::Append | AlterOp::Subtract => {
                    if def.ty != ConfigType::List {
                        return Err(TopicConfigError::NotAList {
                            op: op.name(),
                            name: name.to_owned(),
                            ty: def.ty,
                        });
                    }
                    let ConfigValue::List(current) = next.value(def.name) else {
                        unreachable!("a list config has a list value")
                    };
                    let items = parse_list(need(raw)?.trim());
                    let list = if op == AlterOp::Append {
                        list_append(&current, &items)
                    } else {
                        list_subtract(&current, &items)
                    };
                    let value = def.parse_supported(&list.join(","))?;
                    next.overrides.insert(def.name, value);
                }
            }
        }
        Ok(next)
    }

    /// The value in force: the override, or Kafka's default.
    pub fn value(&self, name: &str) -> ConfigValue {
        let def = lookup(name).unwrap_or_else(|| panic!("{name} is a topic config"));
        self.overrides
            .get(def.name)
            .cloned()
            .unwrap_or_else(|| def.default.value())
    }

    /// Every config with its value and source (DescribeConfigs).
    pub fn describe(&self) -> Vec<DescribedConfig> {
        TOPIC_CONFIGS
            .iter()
            .map(|d| DescribedConfig {
                name: d.name,
                value: self.value(d.name).to_string(),
                source: if self.overrides.contains_key(d.name) {
                    ConfigSource::Topic
                } else {
                    ConfigSource::Default
                },
                ty: d.ty,
            })
            .collect()
    }

    /// The overrides, in Kafka's string form.
    pub fn overrides(&self) -> impl Iterator<Item = (&'static str, String)> + '_ {
        self.overrides.iter().map(|(n, v)| (*n, v.to_string()))
    }

    pub fn cleanup_policy(&self) -> CleanupPolicy {
        let ConfigValue::List(l) = self.value("cleanup.policy") else {
            unreachable!("cleanup.policy is a list")
        };
        CleanupPolicy {
            delete: l.iter().any(|p| p == "delete"),
            compact: l.iter().any(|p| p == "compact"),
        }
    }

    fn long(&self, name: &str) -> i64 {
        match self.value(name) {
            ConfigValue::Long(l) => l,
            ConfigValue::Int(i) => i64::from(i),
            other => unreachable!("{name} is an integer, not {other:?}"),
        }
    }

    /// The cleaner's settings for this topic.
    pub fn compaction_policy(&self) -> CompactionPolicy {
        let ms = |name| u64::try_from(self.long(name)).unwrap_or(0);
        let ConfigValue::Double(ratio) = self.value("min.cleanable.dirty.ratio") else {
            unreachable!("min.cleanable.dirty.ratio is a double")
        };
        CompactionPolicy {
            min_cleanable_dirty_ratio: ratio,
            min_compaction_lag_ms: ms("min.compaction.lag.ms"),
            max_compaction_lag_ms: ms("max.compaction.lag.ms"),
            delete_retention_ms: ms("delete.retention.ms"),
            ..CompactionPolicy::default()
        }
    }

    /// `message.timestamp.type` is LogAppendTime.
    pub fn log_append_time(&self) -> bool {
        self.value("message.timestamp.type") == ConfigValue::String("LogAppendTime".into())
    }

    /// (`message.timestamp.before.max.ms`, `message.timestamp.after.max.ms`).
    pub fn timestamp_bounds_ms(&self) -> (i64, i64) {
        (
            self.long("message.timestamp.before.max.ms"),
            self.long("message.timestamp.after.max.ms"),
        )
    }
}

/// The implemented/refused table of docs/topic-configs.md.
pub fn docs_table() -> String {
    let mut out = String::from(
        "| Config | Type | Kafka default | Valid values | Spate |\n|---|---|---|---|---|\n",
    );
    for d in TOPIC_CONFIGS {
        let valid = match d.valid {
            Valid::Any => "any".to_owned(),
            Valid::AtLeast(m) => format!("[{m}, ...]"),
            Valid::Between(lo, hi) => format!("[{lo}, {hi}]"),
            Valid::BetweenOrMinusOne(lo, hi) => format!("[{lo}, {hi}] or -1"),
            Valid::DoubleBetween(lo, hi) => format!("[{lo:?}, {hi:?}]"),
            Valid::OneOf(v) | Valid::ListOf(v) => v.join(", "),
            Valid::ThrottledReplicas => "`*` or partition:broker pairs".to_owned(),
        };
        let support = match d.support {
            Support::Implemented => "implemented",
            Support::Ignored => "accepted, ignored",
            Support::NotImplemented => "refused (default accepted)",
        };
        let default = d.default.value().to_string();
        let default = if default.is_empty() {
            "\"\"".to_owned()
        } else {
            default
        };
        out.push_str(&format!(
            "| `{}` | {} | {} | {} | {}: {} |\n",
            d.name, d.ty, default, valid, support, d.note
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(c: &TopicConfigs, name: &str, v: &str) -> Result<TopicConfigs, TopicConfigError> {
        c.alter([(name, AlterOp::Set, Some(v))])
    }

    #[test]
    fn every_default_is_valid_and_names_are_unique() {
        let mut names = std::collections::HashSet::new();
        for d in TOPIC_CONFIGS {
            assert!(names.insert(d.name), "{} twice", d.name);
            let default = d.default.value();
            d.validate(&default)
                .unwrap_or_else(|e| panic!("{}: default {default}: {e}", d.name));
            assert_eq!(
                d.parse(&default.to_string()).unwrap(),
                default,
                "{}",
                d.name
            );
        }
        assert!(TOPIC_CONFIGS.len() >= 35);
    }

    #[test]
    fn typed_parsing_with_clear_errors() {
        let c = TopicConfigs::default();
        let e = set(&c, "retention.ms", "abc").unwrap_err();
        assert!(matches!(e, TopicConfigError::InvalidValue { .. }), "{e}");
        assert!(e.to_string().contains("retention.ms"));
        assert!(set(&c, "retention.ms", "-2").is_err());
        assert!(set(&c, "retention.ms", " -1 ").is_ok());
        assert!(set(&c, "retention.ms", "9223372036854775807").is_ok());
        assert!(set(&c, "segment.bytes", "3000000000").is_err(), "an int");
        assert!(set(&c, "min.cleanable.dirty.ratio", "1.5").is_err());
        assert!(set(&c, "min.cleanable.dirty.ratio", "NaN").is_err());
        assert!(set(&c, "message.timestamp.type", "logappendtime").is_err());
        assert!(set(&c, "cleanup.policy", "compact,remove").is_err());
        let e = set(&c, "no.such.config", "1").unwrap_err();
        assert_eq!(e, TopicConfigError::Unknown("no.such.config".into()));
    }

    #[test]
    fn unimplemented_configs_say_so_unless_set_to_the_default() {
        let c = TopicConfigs::default();
        let e = set(&c, "compression.type", "zstd").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("Spate does not implement the topic config compression.type"),
            "{e}"
        );
        assert!(set(&c, "compression.type", "producer").is_ok());
        assert!(set(&c, "min.insync.replicas", "2").is_err());
        assert!(set(&c, "unclean.leader.election.enable", "FALSE").is_ok());
        assert!(matches!(
            set(&c, "preallocate", "yes"),
            Err(TopicConfigError::InvalidValue { .. })
        ));
        assert!(set(&c, "message.downconversion.enable", "false").is_ok());
    }

    #[test]
    fn list_append_and_subtract_as_kafka() {
        let l = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            list_append(&l(&["delete"]), &l(&["compact"])),
            l(&["delete", "compact"])
        );
        assert_eq!(
            list_append(&l(&["delete"]), &l(&["delete"])),
            l(&["delete"])
        );
        assert_eq!(
            list_subtract(&l(&["delete", "compact"]), &l(&["delete"])),
            l(&["compact"])
        );
        assert_eq!(
            list_subtract(&l(&["compact"]), &l(&["delete"])),
            l(&["compact"])
        );

        let c = TopicConfigs::default();
        let c = c
            .alter([("cleanup.policy", AlterOp::Append, Some("compact"))])
            .unwrap();
        assert_eq!(
            c.cleanup_policy(),
            CleanupPolicy {
                delete: true,
                compact: true
            },
            "APPEND starts from the default"
        );
        assert_eq!(c.value("cleanup.policy").to_string(), "delete,compact");
        let c = c
            .alter([("cleanup.policy", AlterOp::Subtract, Some("delete"))])
            .unwrap();
        assert_eq!(c.value("cleanup.policy").to_string(), "compact");
        let e = c
            .alter([("retention.ms", AlterOp::Append, Some("5"))])
            .unwrap_err();
        assert!(matches!(e, TopicConfigError::NotAList { .. }), "{e}");
        assert!(c
            .alter([("cleanup.policy", AlterOp::Append, Some("bogus"))])
            .is_err());
        // All or nothing: a bad second operation leaves the first unapplied.
        assert!(c
            .alter([
                ("retention.ms", AlterOp::Set, Some("1000")),
                ("segment.ms", AlterOp::Set, Some("0")),
            ])
            .is_err());
        assert_eq!(c.value("retention.ms"), ConfigValue::Long(604_800_000));
        let c = c
            .alter([("cleanup.policy", AlterOp::Delete, None)])
            .unwrap();
        assert_eq!(c, TopicConfigs::default());
    }

    #[test]
    fn legacy_alter_configs_replaces_every_override() {
        let c = TopicConfigs::from_pairs([("retention.ms", "1000"), ("cleanup.policy", "compact")])
            .unwrap();
        let replaced = TopicConfigs::from_pairs([("segment.ms", "60000")]).unwrap();
        assert_eq!(c.value("retention.ms"), ConfigValue::Long(1000));
        assert_eq!(
            replaced.value("retention.ms"),
            ConfigValue::Long(604_800_000)
        );
        let described: Vec<_> = replaced
            .describe()
            .into_iter()
            .filter(|d| d.source == ConfigSource::Topic)
            .map(|d| (d.name, d.value))
            .collect();
        assert_eq!(described, vec![("segment.ms", "60000".to_string())]);
    }

    #[test]
    fn kafka_streams_and_debezium_topics_are_accepted() {
        let cases: &[&[(&str, &str)]] = &[
            // Kafka Streams: repartition, changelog, windowed and versioned store changelogs.
            &[
                ("cleanup.policy", "delete"),
                ("segment.bytes", "52428800"),
                ("retention.ms", "-1"),
                ("message.timestamp.type", "CreateTime"),
            ],
            &[
                ("cleanup.policy", "compact"),
                ("message.timestamp.type", "CreateTime"),
            ],
            &[
                ("cleanup.policy", "compact,delete"),
                ("retention.ms", "172800000"),
                ("message.timestamp.type", "CreateTime"),
            ],
            &[
                ("cleanup.policy", "compact"),
                ("min.compaction.lag.ms", "86400000"),
                ("message.timestamp.type", "CreateTime"),
            ],
            // Debezium: schema history topic, Kafka Connect's offsets/configs/status topics.
            &[
                ("cleanup.policy", "delete"),
                ("retention.ms", "9223372036854775807"),
                ("retention.bytes", "-1"),
            ],
            &[("cleanup.policy", "compact")],
        ];
        for pairs in cases {
            TopicConfigs::from_pairs(pairs.iter().copied())
                .unwrap_or_else(|e| panic!("{pairs:?}: {e}"));
        }
        let windowed = TopicConfigs::from_pairs(cases[2].iter().copied()).unwrap();
        assert_eq!(
            windowed.cleanup_policy(),
            CleanupPolicy {
                delete: true,
                compact: true
            }
        );
    }

    #[test]
    fn typed_getters() {
        let c = TopicConfigs::from_pairs([
            ("delete.retention.ms", "1000"),
            ("min.cleanable.dirty.ratio", "0.1"),
            ("message.timestamp.type", "LogAppendTime"),
            ("message.timestamp.before.max.ms", "5000"),
        ])
        .unwrap();
        let p = c.compaction_policy();
        assert_eq!(
            (p.delete_retention_ms, p.min_cleanable_dirty_ratio),
            (1000, 0.1)
        );
        assert_eq!(p.max_compaction_lag_ms, DEFAULT_MAX_COMPACTION_LAG_MS);
        assert!(c.log_append_time());
        assert_eq!(c.timestamp_bounds_ms(), (5000, 3_600_000));
        assert_eq!(
            TopicConfigs::default().compaction_policy(),
            CompactionPolicy::default()
        );
    }

    #[test]
    fn the_docs_table_is_current() {
        let doc = include_str!("../../docs/topic-configs.md");
        let table = docs_table();
        assert!(
            doc.contains(&table),
            "docs/topic-configs.md must contain this table:\n{table}"
        );
    }
}
