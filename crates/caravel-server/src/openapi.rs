//! The OpenAPI 3.1 description of the server, served at `/v1/openapi.json`. Generated:
//! every operation comes from its handler's `#[utoipa::path]` as the route table adds it
//! (`route_doc`), and every schema from the wire type's own definition (`ToSchema`, which
//! reads the serde attributes: defaults, unknown fields refused, flattening). What is added
//! here is what holds for every operation alike: the bearer token, and the one error shape.

use serde_json::{json, Value};

pub fn document() -> Value {
    let mut doc = serde_json::to_value(crate::route_doc()).expect("the document is JSON");
    doc["openapi"] = json!("3.1.0");
    doc["info"] = json!({
        "title": "Caravel API",
        "version": "1",
        "description": "The Caravel control plane. Every endpoint under /v1 takes \
            `Authorization: Bearer TOKEN` unless it says otherwise. Every error, from every \
            layer, is JSON `{error: {code, message, field}}` with a stable `code` \
            (docs/api.md)."
    });
    doc["security"] = json!([{"bearer": []}]);
    let components = doc["components"]
        .as_object_mut()
        .expect("the route table adds schemas");
    components.insert(
        "securitySchemes".into(),
        json!({"bearer": {"type": "http", "scheme": "bearer"}}),
    );
    components.insert(
        "responses".into(),
        json!({"Error": {"description": "an error in the one shape",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}}),
    );
    let schemas = components
        .entry("schemas")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .expect("schemas");
    for (name, schema) in error_schemas() {
        schemas.insert(name, schema);
    }
    // Every answer that is not the operation's own is an error in the one shape. And an
    // operation id names one operation: a handler serving several methods (the gateway's
    // catch-all) or several paths gets one per method and path.
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for ops in doc["paths"].as_object().expect("paths").values() {
        for op in ops.as_object().expect("path item").values() {
            if let Some(id) = op["operationId"].as_str() {
                *seen.entry(id.to_string()).or_default() += 1;
            }
        }
    }
    for (path, ops) in doc["paths"].as_object_mut().expect("paths") {
        for (method, op) in ops.as_object_mut().expect("path item") {
            if method == "parameters" {
                continue;
            }
            op["responses"]["default"] = json!({"$ref": "#/components/responses/Error"});
            let id = op["operationId"].as_str().unwrap_or_default().to_string();
            if seen.get(&id).copied().unwrap_or(0) > 1 {
                let slash = if path.ends_with('/') { "_slash" } else { "" };
                op["operationId"] = json!(format!("{id}{slash}_{method}"));
            }
        }
    }
    doc
}

/// The error body's schemas, from its wire types like every other.
fn error_schemas() -> Vec<(String, Value)> {
    use utoipa::{PartialSchema, ToSchema};
    let mut out = vec![];
    let mut refs = vec![];
    caravel_core::api::ErrorBody::schemas(&mut refs);
    refs.push((
        caravel_core::api::ErrorBody::name().into_owned(),
        caravel_core::api::ErrorBody::schema(),
    ));
    for (name, schema) in refs {
        out.push((name, serde_json::to_value(schema).expect("schema is JSON")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `$ref` in `v`.
    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    match (k.as_str(), x) {
                        ("$ref", Value::String(r)) => out.push(r.clone()),
                        _ => refs(x, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
            _ => {}
        }
    }

    #[test]
    fn every_reference_resolves() {
        let doc = document();
        let mut all = vec![];
        refs(&doc, &mut all);
        assert!(all.len() > 50, "{}", all.len());
        for r in all {
            let pointer = r.strip_prefix('#').expect("local reference");
            assert!(doc.pointer(pointer).is_some(), "{r} does not resolve");
        }
    }

    #[test]
    fn every_path_parameter_is_declared_and_every_operation_is_named() {
        let doc = document();
        let mut ids = std::collections::BTreeSet::new();
        for (path, ops) in doc["paths"].as_object().unwrap() {
            let templated: Vec<&str> = path
                .split('/')
                .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
                .collect();
            for (method, op) in ops.as_object().unwrap() {
                let declared: Vec<&str> = op["parameters"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter(|p| p["in"] == "path")
                            .map(|p| p["name"].as_str().unwrap())
                            .collect()
                    })
                    .unwrap_or_default();
                assert_eq!(templated, declared, "{method} {path}");
                assert!(
                    op["summary"].as_str().is_some_and(|s| !s.is_empty()),
                    "{method} {path}"
                );
                assert!(op["responses"]["default"].is_object(), "{method} {path}");
                let id = op["operationId"].as_str().unwrap().to_string();
                assert!(ids.insert(id.clone()), "operation id {id} is not unique");
            }
        }
        assert!(ids.len() > 50, "{}", ids.len());
    }

    /// The schemas are the wire types': a field added to `JobSpec` is in the document
    /// without anyone writing it there, with serde's defaults and refusals.
    #[test]
    fn schemas_follow_the_wire_types() {
        let doc = document();
        let spec = &doc["components"]["schemas"]["JobSpec"];
        assert_eq!(spec["additionalProperties"], false, "{spec}");
        // Every field has a default (`command` too: an image brings its own).
        assert!(spec["required"].is_null(), "{spec}");
        let tenant = &doc["components"]["schemas"]["CreateTenantRequest"];
        assert_eq!(tenant["required"], json!(["name"]), "{tenant}");
        let json_spec = serde_json::to_value(caravel_core::JobSpec {
            command: "x".into(),
            ..serde_json::from_value(json!({"command": "x"})).unwrap()
        })
        .unwrap();
        for field in json_spec.as_object().unwrap().keys() {
            assert!(
                spec["properties"][field].is_object(),
                "JobSpec.{field} is sent but not documented: {spec}"
            );
        }
        let submit = &doc["paths"]["/v1/jobs"]["post"];
        assert_eq!(
            submit["requestBody"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/JobSpec"
        );
        assert!(submit["responses"]["201"].is_object());
        let err = &doc["components"]["schemas"]["ErrorCode"];
        let codes = err.to_string();
        for code in ["invalid_argument", "rate_limited", "method_not_allowed"] {
            assert!(codes.contains(code), "{err}");
        }
    }
}
