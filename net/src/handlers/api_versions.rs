//! ApiVersions: always answered with a v0 response header; a version this broker does not know
//! gets UNSUPPORTED_VERSION in the v0 layout, so the client can retry with a lower one.

use bytes::Bytes;
use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::{ApiKey, ApiVersionsResponse};
use kafka_protocol::ResponseError;

use crate::dispatch::encode_response;
use crate::error::NetError;
use crate::request::Request;
use crate::versions::{self, SUPPORTED};

pub fn handle(req: &Request) -> Result<Bytes, NetError> {
    let range = versions::lookup(ApiKey::ApiVersions).expect("ApiVersions is in the table");
    let mut resp = ApiVersionsResponse::default();
    resp.api_keys = SUPPORTED
        .iter()
        .map(|s| {
            let mut v = ApiVersion::default();
            v.api_key = s.key as i16;
            v.min_version = s.min;
            v.max_version = s.max;
            v
        })
        .collect();
    let version = if req.api_version > range.max {
        resp.error_code = ResponseError::UnsupportedVersion.code();
        0
    } else {
        req.api_version
    };
    encode_response(req.correlation_id, version, &resp)
}
