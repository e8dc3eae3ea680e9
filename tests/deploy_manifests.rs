//! Every deployment file parses and hangs together: the Kubernetes manifests (deploy/k8s), the
//! compose file, the Prometheus and Alertmanager configuration and the Grafana provisioning.
//! Files generated from others (the rules ConfigMap, the PrometheusRule) must be up to date.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_yaml::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            serde::Deserialize::deserialize(d)
                .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()))
        })
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    cur.as_str()
        .unwrap_or_else(|| panic!("missing {} in {v:?}", path.join(".")))
}

/// deploy/k8s/*.yaml: file name -> its documents.
fn k8s() -> BTreeMap<String, Vec<Value>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(repo().join("deploy/k8s")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            out.insert(
                path.file_name().unwrap().to_string_lossy().to_string(),
                documents(&path),
            );
        }
    }
    out
}

fn of_kind<'a>(files: &'a BTreeMap<String, Vec<Value>>, kind: &str) -> Vec<&'a Value> {
    files
        .values()
        .flatten()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect()
}

#[test]
fn every_kubernetes_manifest_parses_names_its_kind_and_is_listed_in_the_kustomization() {
    let files = k8s();
    for (file, docs) in &files {
        assert!(!docs.is_empty(), "{file} is empty");
        for doc in docs {
            str_at(doc, &["apiVersion"]);
            let kind = str_at(doc, &["kind"]);
            if kind == "Kustomization" {
                continue;
            }
            str_at(doc, &["metadata", "name"]);
            if kind != "Namespace" {
                assert_eq!(
                    str_at(doc, &["metadata", "namespace"]),
                    "safeclock",
                    "{file}"
                );
            }
        }
    }
    let kustomization = &files["kustomization.yaml"][0];
    let listed: BTreeSet<&str> = kustomization["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    for file in files.keys() {
        let expected = file != "kustomization.yaml" && file != "secret.example.yaml";
        assert_eq!(
            listed.contains(file.as_str()),
            expected,
            "{file} in kustomization.yaml"
        );
    }
    for kind in [
        "Namespace",
        "ConfigMap",
        "Deployment",
        "Service",
        "ServiceMonitor",
        "PrometheusRule",
        "NetworkPolicy",
    ] {
        assert!(!of_kind(&files, kind).is_empty(), "no {kind}");
    }
}

#[test]
fn deployments_probe_health_and_readiness_mount_existing_config_maps_and_have_services() {
    let files = k8s();
    let config_maps: BTreeSet<&str> = of_kind(&files, "ConfigMap")
        .iter()
        .map(|c| str_at(c, &["metadata", "name"]))
        .collect();
    let services = of_kind(&files, "Service");
    let deployments = of_kind(&files, "Deployment");
    assert_eq!(deployments.len(), 3);
    for d in deployments {
        let name = str_at(d, &["metadata", "name"]);
        let pod = &d["spec"]["template"];
        let pod_labels = &pod["metadata"]["labels"];
        for (k, v) in d["spec"]["selector"]["matchLabels"].as_mapping().unwrap() {
            assert_eq!(&pod_labels[k.as_str().unwrap()], v, "{name}: selector");
        }
        let container = &pod["spec"]["containers"][0];
        assert_eq!(
            str_at(container, &["livenessProbe", "httpGet", "path"]),
            "/healthz",
            "{name}"
        );
        assert_eq!(
            str_at(container, &["readinessProbe", "httpGet", "path"]),
            "/readyz",
            "{name}"
        );
        assert_eq!(
            container["ports"][0]["containerPort"].as_u64(),
            Some(9464),
            "{name}"
        );
        let args: Vec<&str> = container["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(args[0], "run", "{name}");
        assert!(
            ["clock", "escalator", "exporter"].contains(&args[1]),
            "{name}"
        );
        for volume in pod["spec"]["volumes"].as_sequence().unwrap() {
            let cm = str_at(volume, &["configMap", "name"]);
            assert!(
                config_maps.contains(cm),
                "{name} mounts a missing ConfigMap {cm}"
            );
        }
        let selected = services.iter().any(|s| {
            s["spec"]["selector"]
                .as_mapping()
                .unwrap()
                .iter()
                .all(|(k, v)| &pod_labels[k.as_str().unwrap()] == v)
        });
        assert!(selected, "{name} has no Service");
    }
}

#[test]
fn generated_manifests_match_their_sources() {
    let files = k8s();
    let stale = "out of date: run python3 deploy/k8s/generate.py";
    // The rules ConfigMap holds deploy/rules/*.toml byte for byte.
    let rules = &files["rules-configmap.yaml"][0]["data"];
    let mut on_disk = 0;
    for entry in std::fs::read_dir(repo().join("deploy/rules")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        assert_eq!(
            rules[name.as_str()].as_str(),
            Some(std::fs::read_to_string(&path).unwrap().as_str()),
            "{name}: {stale}"
        );
        on_disk += 1;
    }
    assert_eq!(rules.as_mapping().unwrap().len(), on_disk, "{stale}");
    // The PrometheusRule holds the groups of deploy/prometheus/rules/*.yml.
    let mut groups = Vec::new();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(repo().join("deploy/prometheus/rules"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    for path in paths {
        groups.extend(
            documents(&path)[0]["groups"]
                .as_sequence()
                .unwrap()
                .iter()
                .cloned(),
        );
    }
    let rule = &files["prometheusrule.yaml"][0];
    assert_eq!(
        rule["spec"]["groups"].as_sequence().unwrap(),
        &groups,
        "{stale}"
    );
}

#[test]
fn the_kubernetes_config_is_a_valid_safeclock_configuration() {
    let files = k8s();
    let config = of_kind(&files, "ConfigMap")
        .into_iter()
        .find(|c| str_at(c, &["metadata", "name"]) == "safeclock-config")
        .unwrap();
    let text = str_at(config, &["data", "config.toml"]);
    let dir = std::env::temp_dir().join(format!("safeclock-k8s-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // The rules directory is where the rules ConfigMap is mounted; here, the same files.
    let text = text.replace(
        "/etc/safeclock/rules",
        &repo().join("deploy/rules").display().to_string(),
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    let settings = safeclock_common::config::Settings::load(Some(&path)).unwrap();
    safeclock_common::policy::Policy::load(&settings).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    // The built-in default is loopback; the pods open the ops port (behind the NetworkPolicy)
    // and nothing else.
    assert_eq!(settings.ops.listen.to_string(), "0.0.0.0:9464");
    assert!(settings.intake.listen.ip().is_loopback());
    assert!(settings.escalator.api.listen.ip().is_loopback());
}

#[test]
fn only_prometheus_may_reach_the_ops_port_of_any_safeclock_pod() {
    let files = k8s();
    let policies = of_kind(&files, "NetworkPolicy");
    assert!(!policies.is_empty(), "no NetworkPolicy in deploy/k8s");
    for policy in &policies {
        let name = str_at(policy, &["metadata", "name"]);
        let types: Vec<&str> = policy["spec"]["policyTypes"]
            .as_sequence()
            .unwrap_or_else(|| panic!("{name}: no policyTypes"))
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert!(types.contains(&"Ingress"), "{name}: {types:?}");
        for rule in policy["spec"]["ingress"].as_sequence().unwrap() {
            // A rule without `from` (or with an empty peer) admits every source.
            let from = rule["from"]
                .as_sequence()
                .unwrap_or_else(|| panic!("{name}: an ingress rule without `from` admits anyone"));
            assert!(!from.is_empty(), "{name}: empty `from`");
            for peer in from {
                assert_eq!(
                    peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"].as_str(),
                    Some("prometheus"),
                    "{name}: a peer that is not Prometheus: {peer:?}"
                );
                assert!(
                    peer["namespaceSelector"]["matchLabels"].is_mapping(),
                    "{name}: the Prometheus peer names its namespace: {peer:?}"
                );
                assert!(peer["ipBlock"].is_null(), "{name}: {peer:?}");
            }
            let ports: Vec<u64> = rule["ports"]
                .as_sequence()
                .unwrap_or_else(|| panic!("{name}: a rule without ports opens every port"))
                .iter()
                .map(|p| p["port"].as_u64().unwrap())
                .collect();
            assert_eq!(ports, [9464], "{name}: only the ops port");
        }
    }
    // Every safeclock pod is selected by a policy (so unlisted traffic to it is denied).
    for d in of_kind(&files, "Deployment") {
        let name = str_at(d, &["metadata", "name"]);
        let labels = &d["spec"]["template"]["metadata"]["labels"];
        let covered = policies.iter().any(|p| {
            p["spec"]["podSelector"]["matchLabels"]
                .as_mapping()
                .unwrap()
                .iter()
                .all(|(k, v)| &labels[k.as_str().unwrap()] == v)
        });
        assert!(covered, "{name}: no NetworkPolicy selects its pods");
    }
}

#[test]
fn compose_prometheus_alertmanager_and_grafana_files_parse_and_agree() {
    let compose = &documents(&repo().join("docker-compose.yml"))[0];
    let services = compose["services"].as_mapping().unwrap();
    for s in [
        "kafka",
        "clock",
        "escalator",
        "exporter",
        "prometheus",
        "alertmanager",
        "grafana",
    ] {
        assert!(services.contains_key(s), "docker-compose.yml has no {s}");
    }
    // The services' ops endpoints bind loopback by default: compose opens them to its network
    // explicitly, and publishes them (and the acknowledgement API) on the host's loopback only.
    for s in ["clock", "escalator", "exporter"] {
        let service = &compose["services"][s];
        assert_eq!(
            service["environment"]["SAFECLOCK__OPS__LISTEN"].as_str(),
            Some("0.0.0.0:9464"),
            "{s}"
        );
        for port in service["ports"].as_sequence().unwrap() {
            let port = port.as_str().unwrap();
            assert!(port.starts_with("127.0.0.1:"), "{s} publishes {port}");
        }
    }
    let mounts: Vec<&str> = compose["services"]["prometheus"]["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        mounts
            .iter()
            .any(|m| m.starts_with("./deploy/prometheus/rules:")),
        "{mounts:?}"
    );

    let prometheus = &documents(&repo().join("deploy/prometheus/prometheus.yml"))[0];
    let rule_files = prometheus["rule_files"].as_sequence().unwrap();
    assert!(!rule_files.is_empty(), "prometheus.yml loads no rules");
    let jobs: BTreeSet<&str> = prometheus["scrape_configs"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|j| str_at(j, &["job_name"]))
        .collect();
    // The alert rules expect these job names.
    for job in [
        "safeclock-clock",
        "safeclock-escalator",
        "safeclock-exporter",
    ] {
        assert!(jobs.contains(job), "prometheus.yml has no job {job}");
    }
    let alertmanager = &documents(&repo().join("deploy/alertmanager/alertmanager.yml"))[0];
    str_at(alertmanager, &["route", "receiver"]);
    for file in [
        "deploy/grafana/provisioning/datasources/prometheus.yml",
        "deploy/grafana/provisioning/dashboards/safeclock.yml",
    ] {
        assert!(!documents(&repo().join(file)).is_empty(), "{file}");
    }
    for entry in std::fs::read_dir(repo().join("deploy/grafana/dashboards")).unwrap() {
        let path = entry.unwrap().path();
        let board: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert!(board["uid"].is_string(), "{}", path.display());
        assert!(!board["panels"].as_array().unwrap().is_empty());
    }
}
