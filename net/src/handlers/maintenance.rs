//! A broker's maintenance mode as a dynamic broker config: IncrementalAlterConfigs of a BROKER
//! resource (the broker id as its name) setting `spate.maintenance.mode` to `true` or `false`
//! (DELETE is `false`), and DescribeConfigs of that resource showing it. Kafka has no
//! maintenance API; a per-broker dynamic config is how Kafka's own tools change one broker's
//! behaviour at run time (`kafka-configs --entity-type brokers --entity-name 2 --alter
//! --add-config spate.maintenance.mode=true` works too), and any node carries it to the
//! controller like the other admin requests.
//!
//! Decommissioning is carried the same way: `spate.decommission` `true` drains every replica
//! off the broker (the controller moves them, a bounded number at a time), `false`
//! (recommission) stops new moves.

use kafka_protocol::messages::incremental_alter_configs_request::AlterConfigsResource;
use kafka_protocol::ResponseError;

use crate::shard::Shard;

/// The broker config that holds maintenance mode.
pub const MAINTENANCE_CONFIG: &str = "spate.maintenance.mode";
/// The broker config that holds decommissioning.
pub const DECOMMISSION_CONFIG: &str = "spate.decommission";
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

/// Whether `name` is a broker config that changes at run time.
pub fn is_dynamic(name: &str) -> bool {
    name == MAINTENANCE_CONFIG || name == DECOMMISSION_CONFIG
}

/// IncrementalAlterConfigs of a BROKER resource: only [`MAINTENANCE_CONFIG`] and
/// [`DECOMMISSION_CONFIG`] can change.
pub async fn alter(
    shard: &Shard,
    res: &AlterConfigsResource,
    validate_only: bool,
) -> Result<(), (i16, String)> {
    let invalid = |msg: String| (ResponseError::InvalidConfig.code(), msg);
    let Some(port) = &shard.config.cluster else {
        return Err((
            ResponseError::InvalidRequest.code(),
            "not a cluster: maintenance mode and decommissioning need --seeds; other broker \
             settings are static (restart with new flags)"
                .into(),
        ));
    };
    let node = broker_id(res.resource_name.as_str())?;
    let mut maintenance = None;
    let mut decommission = None;
    for c in &res.configs {
        let name = c.name.as_str();
        if !is_dynamic(name) {
            return Err(invalid(format!(
                "broker config {name} cannot be changed at run time; only {MAINTENANCE_CONFIG} \
                 and {DECOMMISSION_CONFIG} can (other settings are static: restart with new \
                 flags)"
            )));
        }
        let on = match (c.config_operation, c.value.as_deref()) {
            (OP_SET, Some("true")) => true,
            (OP_SET, Some("false")) | (OP_DELETE, _) => false,
            (OP_SET, v) => return Err(invalid(format!("{name} is true or false, not {v:?}"))),
            (op, _) => return Err(invalid(format!("operation {op} on a boolean config"))),
        };
        if name == MAINTENANCE_CONFIG {
            maintenance = Some(on);
        } else {
            decommission = Some(on);
        }
    }
    if validate_only {
        return Ok(());
    }
    if let Some(on) = maintenance {
        port.set_maintenance(node, on)
            .await
            .map_err(|e| (e.code, e.message))?;
        tracing::info!(node, on, "broker maintenance mode set");
    }
    if let Some(on) = decommission {
        port.set_decommission(node, on)
            .await
            .map_err(|e| (e.code, e.message))?;
        tracing::info!(node, on, "broker decommission set");
    }
    Ok(())
}

/// The run-time broker configs of the broker a BROKER resource names, as this node has
/// applied them: (name, value) of [`MAINTENANCE_CONFIG`] and [`DECOMMISSION_CONFIG`] (none
/// outside a cluster or for a name that is not a broker id).
pub fn describe(shard: &Shard, name: &str) -> Vec<(&'static str, String)> {
    let Some(port) = shard.config.cluster.as_ref() else {
        return Vec::new();
    };
    let Ok(node) = broker_id(name) else {
        return Vec::new();
    };
    let view = port.view();
    vec![
        (
            MAINTENANCE_CONFIG,
            view.metadata.maintenance.contains(&node).to_string(),
        ),
        (
            DECOMMISSION_CONFIG,
            view.metadata.decommissioning.contains(&node).to_string(),
        ),
    ]
}
