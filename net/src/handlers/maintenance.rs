//! A broker's maintenance mode as a dynamic broker config: IncrementalAlterConfigs of a BROKER
//! resource (the broker id as its name) setting `spate.maintenance.mode` to `true` or `false`
//! (DELETE is `false`), and DescribeConfigs of that resource showing it. Kafka has no
//! maintenance API; a per-broker dynamic config is how Kafka's own tools change one broker's
//! behaviour at run time (`kafka-configs --entity-type brokers --entity-name 2 --alter
//! --add-config spate.maintenance.mode=true` works too), and any node carries it to the
//! controller like the other admin requests.

use kafka_protocol::messages::incremental_alter_configs_request::AlterConfigsResource;
use kafka_protocol::ResponseError;

use crate::shard::Shard;

/// The broker config that holds maintenance mode.
pub const MAINTENANCE_CONFIG: &str = "spate.maintenance.mode";
/// IncrementalAlterConfigs operations (Kafka's `OpType`).
const OP_SET: i8 = 0;
const OP_DELETE: i8 = 1;

/// The broker id a BROKER resource names.
fn broker_id(name: &str) -> Result<u64, (i16, String)> {
    name.parse::<i32>()
        .ok()
        .and_then(|n| u64::try_from(n).ok())
        .ok_or_else(|| {
            (
                ResponseError::InvalidRequest.code(),
                format!(
                    "broker resource {name:?}: name one broker by its id (cluster-wide broker \
                     configs are static)"
                ),
            )
        })
}

/// IncrementalAlterConfigs of a BROKER resource: only [`MAINTENANCE_CONFIG`] can change.
pub async fn alter(
    shard: &Shard,
    res: &AlterConfigsResource,
    validate_only: bool,
) -> Result<(), (i16, String)> {
    let invalid = |msg: String| (ResponseError::InvalidConfig.code(), msg);
    let Some(port) = &shard.config.cluster else {
        return Err((
            ResponseError::InvalidRequest.code(),
            "not a cluster: maintenance mode needs --seeds; other broker settings are static \
             (restart with new flags)"
                .into(),
        ));
    };
    let node = broker_id(res.resource_name.as_str())?;
    let mut on = None;
    for c in &res.configs {
        if c.name.as_str() != MAINTENANCE_CONFIG {
            return Err(invalid(format!(
                "broker config {} cannot be changed at run time; only {MAINTENANCE_CONFIG} can \
                 (other settings are static: restart with new flags)",
                c.name.as_str()
            )));
        }
        on = Some(match (c.config_operation, c.value.as_deref()) {
            (OP_SET, Some("true")) => true,
            (OP_SET, Some("false")) | (OP_DELETE, _) => false,
            (OP_SET, v) => {
                return Err(invalid(format!(
                    "{MAINTENANCE_CONFIG} is true or false, not {v:?}"
                )))
            }
            (op, _) => return Err(invalid(format!("operation {op} on a boolean config"))),
        });
    }
    let Some(on) = on else { return Ok(()) };
    if validate_only {
        return Ok(());
    }
    port.set_maintenance(node, on)
        .await
        .map_err(|e| (e.code, e.message))?;
    tracing::info!(node, on, "broker maintenance mode set");
    Ok(())
}

/// [`MAINTENANCE_CONFIG`] of the broker a BROKER resource names, as this node has applied it
/// (none outside a cluster or for a name that is not a broker id).
pub fn describe(shard: &Shard, name: &str) -> Option<String> {
    let port = shard.config.cluster.as_ref()?;
    let node = broker_id(name).ok()?;
    Some(port.view().metadata.maintenance.contains(&node).to_string())
}
