//! Every example in policies/ is valid, and a broken policy is refused with its location.

use std::process::Command;

fn gateway() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gateway"))
}

#[test]
fn every_example_policy_passes_check() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../policies");
    let files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    assert!(files.len() >= 2, "no example policies in {dir}");
    let out = gateway()
        .args(["policy", "check"])
        .args(&files)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().filter(|l| l.contains(": ok:")).count(),
        files.len()
    );
}

#[test]
fn a_broken_policy_is_refused_with_file_line_and_column() {
    let dir = std::env::temp_dir().join(format!("gateway-policy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("broken.toml");
    std::fs::write(
        &file,
        "version = 1\n[[network.allow]]\ncidr = \"10.0.0.0/33\"\nports = [22]\n",
    )
    .unwrap();
    let out = gateway()
        .args(["policy", "check"])
        .arg(&file)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}:3:8: bad CIDR", file.display())),
        "{stderr}"
    );
}
