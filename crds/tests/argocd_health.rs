//! Runs the Argo CD health checks in `argocd/resource_customizations/` against their test cases,
//! the way Argo CD does: each `health_test.yaml` names an object and the status and message the
//! script must return for it. Lua 5.1, as Argo CD's interpreter.

use std::path::{Path, PathBuf};

use mlua::{Lua, LuaSerdeExt, SerializeOptions, Table};
use serde::Deserialize;

#[derive(Deserialize)]
struct Cases {
    tests: Vec<Case>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Case {
    health_status: Expected,
    input_path: String,
}

#[derive(Deserialize, Debug, PartialEq)]
struct Expected {
    status: String,
    message: String,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../argocd/resource_customizations/fleetwarden.io")
}

fn run(script: &str, object: &serde_json::Value) -> mlua::Result<Expected> {
    let lua = Lua::new();
    let options = SerializeOptions::new()
        .serialize_none_to_null(false)
        .serialize_unit_to_null(false);
    lua.globals()
        .set("obj", lua.to_value_with(object, options)?)?;
    let result: Table = lua.load(script).eval()?;
    Ok(Expected {
        status: result.get("status")?,
        message: result.get("message")?,
    })
}

#[test]
fn every_kind_has_a_health_check_and_every_case_passes() {
    let mut checked = 0;
    for kind in ["Device", "DeviceGroup", "UpdateRollout"] {
        let dir = root().join(kind);
        let script = std::fs::read_to_string(dir.join("health.lua"))
            .unwrap_or_else(|e| panic!("{kind}/health.lua: {e}"));
        let cases: Cases =
            serde_norway::from_str(&std::fs::read_to_string(dir.join("health_test.yaml")).unwrap())
                .unwrap_or_else(|e| panic!("{kind}/health_test.yaml: {e}"));
        assert!(cases.tests.len() >= 4, "{kind}: too few cases");
        for case in cases.tests {
            let input = std::fs::read_to_string(dir.join(&case.input_path))
                .unwrap_or_else(|e| panic!("{kind}/{}: {e}", case.input_path));
            let object: serde_json::Value = serde_norway::from_str(&input).unwrap();
            let got = run(&script, &object)
                .unwrap_or_else(|e| panic!("{kind}/{}: the script failed: {e}", case.input_path));
            assert_eq!(got, case.health_status, "{kind}/{}", case.input_path);
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} cases");
}

#[test]
fn the_argocd_cm_snippet_carries_the_current_scripts() {
    // The documented argocd-cm patch embeds the scripts; it must not drift from them.
    let snippet = std::fs::read_to_string(root().join("../../argocd-cm.yaml")).unwrap();
    let cm: serde_json::Value = serde_norway::from_str(&snippet).unwrap();
    for kind in ["Device", "DeviceGroup", "UpdateRollout"] {
        let script = std::fs::read_to_string(root().join(kind).join("health.lua")).unwrap();
        let key = format!("resource.customizations.health.fleetwarden.io_{kind}");
        assert_eq!(
            cm["data"][&key].as_str(),
            Some(script.as_str()),
            "argocd/argocd-cm.yaml is stale for {kind}: run scripts/argocd-cm.sh"
        );
    }
}
