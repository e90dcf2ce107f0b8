//! Post-processing of the derived OpenAPI schemas.
//!
//! schemars writes an optional enum as `enum: [A, B, null]` plus `nullable: true`. The `null`
//! entry is redundant (nullable already admits null) and breaks older API servers and kubectl's
//! client-side validation ("unknown object type nil"), so it is removed.

/// Marks every array under `status` nullable, to match [`crate::common::null_as_empty`]: the
/// API server would otherwise refuse a status write after server-side apply emptied a list.
pub(crate) fn status_arrays_nullable(root: &mut JSONSchemaProps) {
    fn walk(schema: &mut JSONSchemaProps) {
        if schema.type_.as_deref() == Some("array") {
            schema.nullable = Some(true);
        }
        for child in schema.properties.iter_mut().flat_map(|p| p.values_mut()) {
            walk(child);
        }
        if let Some(JSONSchemaPropsOrArray::Schema(item)) = schema.items.as_mut() {
            walk(item);
        }
    }
    if let Some(status) = root.properties.as_mut().and_then(|p| p.get_mut("status")) {
        walk(status);
    }
}

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};

pub(crate) fn drop_null_enum_values(schema: &mut JSONSchemaProps) {
    if let Some(values) = schema.enum_.as_mut() {
        values.retain(|v| !v.0.is_null());
    }
    let children = schema
        .properties
        .iter_mut()
        .flat_map(|p| p.values_mut())
        .chain(schema.all_of.iter_mut().flatten())
        .chain(schema.any_of.iter_mut().flatten())
        .chain(schema.one_of.iter_mut().flatten())
        .chain(schema.not.as_deref_mut());
    for child in children {
        drop_null_enum_values(child);
    }
    match schema.items.as_mut() {
        Some(JSONSchemaPropsOrArray::Schema(item)) => drop_null_enum_values(item),
        Some(JSONSchemaPropsOrArray::Schemas(items)) => {
            items.iter_mut().for_each(drop_null_enum_values)
        }
        None => {}
    }
    if let Some(JSONSchemaPropsOrBool::Schema(extra)) = schema.additional_properties.as_mut() {
        drop_null_enum_values(extra);
    }
}

#[cfg(test)]
mod tests {
    use crate::{DeviceGroupStatus, DeviceStatus, UpdateRolloutStatus};

    #[test]
    fn status_lists_left_null_by_server_side_apply_read_as_empty() {
        let d: DeviceStatus =
            serde_json::from_str(r#"{"conditions": null, "reported": {"addresses": null}}"#)
                .unwrap();
        assert!(d.conditions.is_empty());
        let g: DeviceGroupStatus =
            serde_json::from_str(r#"{"conditions": null, "revokedSerials": null}"#).unwrap();
        assert!(g.revoked_serials.is_empty());
        let r: UpdateRolloutStatus =
            serde_json::from_str(r#"{"waves": null, "conditions": null}"#).unwrap();
        assert!(r.waves.is_empty());
    }

    #[test]
    fn every_status_array_is_nullable_in_the_crds() {
        for crd in crate::crds() {
            let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
            let status = &schema["openAPIV3Schema"]["properties"]["status"];
            let mut stack = vec![status];
            while let Some(v) = stack.pop() {
                if v["type"] == "array" {
                    assert_eq!(v["nullable"], true, "{:?}: {v}", crd.metadata.name);
                }
                if let Some(props) = v["properties"].as_object() {
                    stack.extend(props.values());
                }
                if v["items"].is_object() {
                    stack.push(&v["items"]);
                }
            }
        }
    }

    #[test]
    fn no_generated_enum_admits_null_explicitly() {
        for crd in crate::crds() {
            let json = serde_json::to_value(&crd).unwrap();
            let mut stack = vec![&json];
            while let Some(v) = stack.pop() {
                match v {
                    serde_json::Value::Object(map) => {
                        if let Some(serde_json::Value::Array(values)) = map.get("enum") {
                            assert!(
                                values.iter().all(|x| !x.is_null()),
                                "{:?} has null in an enum",
                                crd.metadata.name
                            );
                        }
                        stack.extend(map.values());
                    }
                    serde_json::Value::Array(items) => stack.extend(items),
                    _ => {}
                }
            }
        }
    }
}
