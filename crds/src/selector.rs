//! Kubernetes label selectors (`matchLabels` and `matchExpressions`), evaluated the way the API
//! server does, for rollout targets and canary waves.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// Whether `labels` satisfy `selector`. An empty selector matches everything; an unknown
/// operator matches nothing (the API server would have refused it).
pub fn matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions_ok = selector.match_expressions.iter().flatten().all(|e| {
        let value = labels.get(&e.key);
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    labels_ok && expressions_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: Some(values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn selectors_match_like_the_api_server() {
        let plc_canary = labels(&[("role", "plc"), ("canary", "true")]);
        let hmi = labels(&[("role", "hmi")]);
        let by_label = LabelSelector {
            match_labels: Some([("canary".into(), "true".into())].into()),
            ..Default::default()
        };
        assert!(matches(&by_label, &plc_canary) && !matches(&by_label, &hmi));
        let in_roles = LabelSelector {
            match_expressions: Some(vec![expr("role", "In", &["plc", "sensor"])]),
            ..Default::default()
        };
        assert!(matches(&in_roles, &plc_canary) && !matches(&in_roles, &hmi));
        let not_in = LabelSelector {
            match_expressions: Some(vec![expr("role", "NotIn", &["plc"])]),
            ..Default::default()
        };
        assert!(
            !matches(&not_in, &plc_canary)
                && matches(&not_in, &hmi)
                && matches(&not_in, &labels(&[]))
        );
        let exists = LabelSelector {
            match_expressions: Some(vec![expr("canary", "Exists", &[])]),
            ..Default::default()
        };
        assert!(matches(&exists, &plc_canary) && !matches(&exists, &hmi));
        let absent = LabelSelector {
            match_expressions: Some(vec![expr("canary", "DoesNotExist", &[])]),
            ..Default::default()
        };
        assert!(!matches(&absent, &plc_canary) && matches(&absent, &hmi));
        assert!(
            matches(&LabelSelector::default(), &hmi),
            "empty selector matches all"
        );
        let bogus = LabelSelector {
            match_expressions: Some(vec![expr("role", "Like", &["p*"])]),
            ..Default::default()
        };
        assert!(!matches(&bogus, &plc_canary));
    }
}
