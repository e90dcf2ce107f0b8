//! Writes the generated CRD YAML, one file per kind:
//!
//! - Fleetwarden's CRDs into `charts/fleetwarden/crds/` (Helm installs them; `kubectl apply -f`
//!   works too);
//! - the cert-manager subset into `e2e/crds/`, for test control planes without cert-manager.
//!
//!   crdgen            write the files
//!   crdgen --check    exit 1, naming the stale files, when the committed YAML differs
//!   crdgen --stdout   print Fleetwarden's CRDs as one multi-document stream

use std::{path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    let mut check = false;
    let mut stdout = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--check" => check = true,
            "--stdout" => stdout = true,
            "-h" | "--help" => {
                eprintln!("usage: crdgen [--check] [--stdout]");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("crdgen: unknown argument {other:?}\nusage: crdgen [--check] [--stdout]");
                return ExitCode::from(2);
            }
        }
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let outputs = [
        (root.join("charts/fleetwarden/crds"), crds::crds()),
        (root.join("e2e/crds"), crds::test_crds()),
    ];

    let mut stale = Vec::new();
    for (dir, set) in outputs {
        for crd in set {
            let yaml = match crds::render_crd_yaml(&crd) {
                Ok(y) => y,
                Err(e) => {
                    eprintln!("crdgen: cannot render {:?}: {e}", crd.metadata.name);
                    return ExitCode::FAILURE;
                }
            };
            let path = dir.join(crds::crd_file_name(&crd));
            if stdout {
                if crd.spec.group == crds::API_GROUP {
                    print!("---\n{yaml}");
                }
            } else if check {
                if std::fs::read_to_string(&path).ok().as_deref() != Some(yaml.as_str()) {
                    stale.push(path);
                }
            } else if let Err(e) =
                std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(&path, yaml))
            {
                eprintln!("crdgen: cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            } else {
                eprintln!("crdgen: wrote {}", path.display());
            }
        }
    }
    if !stale.is_empty() {
        for path in &stale {
            eprintln!("crdgen: stale or missing: {}", path.display());
        }
        eprintln!(
            "crdgen: regenerate with `cargo run -p fleetwarden-crds --bin crdgen` and commit the result"
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
