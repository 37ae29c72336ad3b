//! The README documents every flag the binary has, so the two cannot drift apart.

#[test]
fn readme_documents_every_flag() {
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_visionserve"))
        .arg("--help")
        .output()
        .expect("binary runs");
    assert!(help.status.success());
    let help = String::from_utf8(help.stdout).unwrap();
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let flags: Vec<&str> = help
        .split_whitespace()
        .filter_map(|word| word.strip_prefix("--"))
        .map(|flag| flag.trim_end_matches(|c: char| !c.is_ascii_alphanumeric() && c != '-'))
        .filter(|flag| !flag.is_empty() && !["help", "version"].contains(flag))
        .collect();
    assert!(
        flags.len() >= 15,
        "expected the full flag list, got {flags:?}"
    );
    for flag in flags {
        assert!(
            readme.contains(&format!("--{flag} ")),
            "README.md does not document --{flag}"
        );
        let env = format!("VISIONSERVE_{}", flag.replace('-', "_").to_uppercase());
        if help.contains(&env) {
            assert!(readme.contains(&env), "README.md does not name {env}");
        }
    }
}
