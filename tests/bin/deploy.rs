//! The Kubernetes examples in deploy/ against the config format: for each
//! kustomization with a configMapGenerator, the config file it puts into the
//! ConfigMap must pass `token-injector check`, and every file that config
//! names must sit under a volume the deployment mounts into the
//! token-injector container. The files themselves (Secret, projected
//! ServiceAccount token) exist only in a pod, so they are created in a
//! temporary directory and the config's absolute paths are rewritten to it.
//! deploy/lint.sh checks the manifests against the Kubernetes schemas.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_token-injector");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// Where the deployments mount the ConfigMap.
const CONFIG_MOUNT: &str = "/etc/token-injector";

/// The files listed under `configMapGenerator:` … `files:` in a
/// kustomization.yaml (only the subset of YAML these examples use:
/// `- name` or `- key=name` items).
fn generator_files(kustomization: &str) -> Vec<String> {
    let mut files = Vec::new();
    let mut in_generator = false;
    let mut in_files = false;
    for line in kustomization.lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if !line.starts_with(' ') && !line.starts_with('-') {
            in_generator = trimmed == "configMapGenerator:";
            in_files = false;
            continue;
        }
        if !in_generator {
            continue;
        }
        if trimmed == "files:" {
            in_files = true;
        } else if let Some(item) = trimmed.strip_prefix("- ").filter(|_| in_files) {
            if item.contains(':') {
                in_files = false; // the next generator entry (`- name: …`)
            } else {
                let file = item.rsplit('=').next().unwrap().trim();
                files.push(file.trim_matches('"').to_string());
            }
        } else if trimmed.ends_with(':') || trimmed.contains(": ") {
            in_files = trimmed == "files:";
        }
    }
    files
}

/// Every quoted absolute path in the config outside the config mount.
fn absolute_paths(config: &str) -> Vec<String> {
    let mut paths = Vec::new();
    for line in config.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        for (i, part) in line.split('"').enumerate() {
            if i % 2 == 1 && part.starts_with('/') && !paths.iter().any(|p| p == part) {
                paths.push(part.to_string());
            }
        }
    }
    paths
}

/// The `mountPath:` values in a manifest.
fn mount_paths(manifest: &str) -> Vec<String> {
    manifest
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("- mountPath:")
                .or(l.trim().strip_prefix("mountPath:"))
        })
        .map(|p| p.trim().trim_matches('"').to_string())
        .collect()
}

fn check_example(dir: &Path) -> usize {
    let kustomization = std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap();
    let deployment = std::fs::read_to_string(dir.join("deployment.yaml")).unwrap();
    let mounts = mount_paths(&deployment);
    assert!(
        mounts.iter().any(|m| m == CONFIG_MOUNT),
        "{}: no volume mounted at {CONFIG_MOUNT}",
        dir.display()
    );
    assert!(
        deployment.contains(&format!("{CONFIG_MOUNT}/config.toml")),
        "{}: the container does not run with --config {CONFIG_MOUNT}/config.toml",
        dir.display()
    );
    let files = generator_files(&kustomization);
    assert!(
        files.iter().any(|f| f == "config.toml"),
        "{}: configMapGenerator has no config.toml: {files:?}",
        dir.display()
    );
    for file in &files {
        let mut config = std::fs::read_to_string(dir.join(file)).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        for path in absolute_paths(&config) {
            let parent = Path::new(&path).parent().unwrap().to_str().unwrap();
            assert!(
                mounts.iter().any(|m| m == parent),
                "{}/{file}: {path} is not in a mounted volume (mounts: {mounts:?})",
                dir.display()
            );
            let local: PathBuf = tmp.path().join(path.trim_start_matches('/'));
            std::fs::create_dir_all(local.parent().unwrap()).unwrap();
            // A secret, or a ServiceAccount token for client_assertion_file:
            // `check` only reads these. A file that must parse gets a real
            // one of its kind: the shared cache's key (base64 of 32 bytes,
            // as `openssl rand -base64 32` writes) and a CA certificate.
            let content = if config.contains(&format!("encryption_key_file = \"{path}\"")) {
                "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n".to_owned()
            } else if config.contains(&format!("ca_file = \"{path}\"")) {
                token_injector::demo::pki::Ca::new("deploy test CA")
                    .unwrap()
                    .pem()
                    .to_owned()
            } else {
                "placeholder-from-tests-deploy\n".to_owned()
            };
            std::fs::write(&local, content).unwrap();
            std::fs::set_permissions(&local, std::fs::Permissions::from_mode(0o400)).unwrap();
            config = config.replace(&format!("\"{path}\""), &format!("\"{}\"", local.display()));
        }
        let copy = tmp.path().join(file);
        std::fs::write(&copy, &config).unwrap();
        let out = Command::new(BIN)
            .arg("check")
            .arg("--config")
            .arg(&copy)
            .env_remove("TOKEN_INJECTOR_CONFIG")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}/{file}: check failed:\n{}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(": ok ("),
            "{}/{file}: {stdout}",
            dir.display()
        );
    }
    files.len()
}

#[test]
fn kustomization_parser_finds_generator_files() {
    let text = "namespace: x\nconfigMapGenerator:\n  - name: a\n    files:\n      - config.toml\n      - extra=other.toml\n  - name: b\n    literals:\n      - k=v\nresources:\n  - d.yaml\n";
    assert_eq!(generator_files(text), ["config.toml", "other.toml"]);
}

#[test]
fn sidecar_config_passes_check() {
    let n = check_example(&Path::new(ROOT).join("deploy/sidecar"));
    assert_eq!(n, 1);
}

#[test]
fn egress_gateway_config_passes_check() {
    let n = check_example(&Path::new(ROOT).join("deploy/egress-gateway"));
    assert_eq!(n, 1);
}

#[test]
fn shared_cache_gateway_config_passes_check() {
    let n = check_example(&Path::new(ROOT).join("deploy/egress-gateway-shared"));
    assert_eq!(n, 1);
}

#[test]
fn every_kustomization_with_a_config_is_checked() {
    let mut with_config = Vec::new();
    for entry in std::fs::read_dir(Path::new(ROOT).join("deploy")).unwrap() {
        let dir = entry.unwrap().path();
        let Ok(text) = std::fs::read_to_string(dir.join("kustomization.yaml")) else {
            continue;
        };
        if !generator_files(&text).is_empty() {
            with_config.push(dir.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    with_config.sort();
    assert_eq!(
        with_config,
        ["egress-gateway", "egress-gateway-shared", "sidecar"]
    );
}
