//! Writes the Fleetwarden CRDs as YAML, one file per kind, into `charts/fleetwarden/crds/`
//! (where Helm installs them and `kubectl apply -f` can too).
//!
//!   crdgen            write the files
//!   crdgen --check    exit 1, naming the stale files, when the committed YAML differs
//!   crdgen --stdout   print all CRDs as one multi-document stream
//!   crdgen --dir D    use D instead of the chart directory

use std::{path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    let mut check = false;
    let mut stdout = false;
    let mut dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/fleetwarden/crds");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--check" => check = true,
            "--stdout" => stdout = true,
            "--dir" => match args.next() {
                Some(d) => dir = PathBuf::from(d),
                None => return usage("--dir needs a directory"),
            },
            "-h" | "--help" => return usage(""),
            other => return usage(&format!("unknown argument {other:?}")),
        }
    }

    let mut stale = Vec::new();
    for crd in crds::crds() {
        let yaml = match crds::render_crd_yaml(&crd) {
            Ok(y) => y,
            Err(e) => {
                eprintln!("crdgen: cannot render {:?}: {e}", crd.metadata.name);
                return ExitCode::FAILURE;
            }
        };
        if stdout {
            print!("---\n{yaml}");
            continue;
        }
        let path = dir.join(crds::crd_file_name(&crd));
        if check {
            if std::fs::read_to_string(&path).ok().as_deref() != Some(yaml.as_str()) {
                stale.push(path);
            }
        } else {
            if let Err(e) = std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(&path, yaml))
            {
                eprintln!("crdgen: cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
            eprintln!("crdgen: wrote {}", path.display());
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

fn usage(problem: &str) -> ExitCode {
    if !problem.is_empty() {
        eprintln!("crdgen: {problem}");
    }
    eprintln!("usage: crdgen [--check] [--stdout] [--dir DIR]");
    if problem.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    }
}
