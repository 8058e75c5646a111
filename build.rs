//! Stamps the binary with the commit it was built from, for `tokenfan_build_info`:
//! `TOKENFAN_COMMIT` when the build sets it (a Docker build has no `.git`), else `git`.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=TOKENFAN_COMMIT");
    if std::env::var_os("TOKENFAN_COMMIT").is_some() {
        return;
    }
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|output| output.status.success())
            .and_then(|output| String::from_utf8(output.stdout).ok())
            .map(|text| text.trim().to_owned())
    };
    if let Some(commit) = git(&["rev-parse", "--short=12", "HEAD"]) {
        println!("cargo:rustc-env=TOKENFAN_COMMIT={commit}");
    }
    // A new commit moves the HEAD reflog: build again to stamp it.
    if let Some(reflog) = git(&["rev-parse", "--git-path", "logs/HEAD"]) {
        println!("cargo:rerun-if-changed={reflog}");
    }
}
