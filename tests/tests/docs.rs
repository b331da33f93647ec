//! The docs against the code: every command the README shows exists, and docs/configuration.md
//! lists exactly the configuration keys the code accepts.
//!
//! - `readme_commands_exist`: every `scripts/<name> [<subcommand>]` in README.md's shell blocks
//!   is an executable script whose `--help` names that subcommand; every `ergon`/`ergond`
//!   subcommand shown is one the binary's `--help` lists.
//! - `configuration_md_lists_every_key_and_only_real_ones`: the keys documented for
//!   `ergond.toml` and `accounting.toml` (`| \`key\` |` rows, dotted within sections) against
//!   the keys the parsers accept. The parsers reject unknown keys and name the expected ones
//!   (`unknown field `x`, expected one of …`), which gives the code's list per section; a
//!   documented key given a value of an impossible type must fail for its type, not as unknown.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Lines inside ```sh fences.
fn shell_lines(md: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in md.lines() {
        let t = line.trim_start();
        if t.starts_with("```") {
            inside = !inside && t.trim_start_matches('`').starts_with("sh");
            continue;
        }
        if inside {
            out.push(line.split(" #").next().unwrap_or("").trim().to_owned());
        }
    }
    out
}

fn help_of(program: &Path) -> String {
    let out = Command::new(program)
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", program.display()));
    assert!(
        out.status.success(),
        "{} --help failed: {}",
        program.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn readme_commands_exist() {
    use std::os::unix::fs::PermissionsExt;
    let lines = shell_lines(&read("README.md"));
    assert!(lines.len() >= 5, "README has no shell blocks? {lines:?}");
    let mut checked = 0;
    for line in &lines {
        for (i, _) in line.match_indices("scripts/") {
            let words: Vec<&str> = line[i..]
                .split(|c: char| c.is_whitespace() || c == ')' || c == '"')
                .filter(|w| !w.is_empty())
                .collect();
            let script = root().join(words[0]);
            let mode = std::fs::metadata(&script)
                .unwrap_or_else(|e| panic!("README runs {}: {e}", words[0]))
                .permissions()
                .mode();
            assert!(mode & 0o111 != 0, "{} is not executable", words[0]);
            let help = help_of(&script);
            if let Some(sub) = words.get(1).filter(|w| !w.starts_with('-')) {
                assert!(
                    help.contains(sub),
                    "README runs `{} {sub}`, which `{} --help` does not mention:\n{help}",
                    words[0],
                    words[0]
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 5, "only {checked} script commands found");

    // `ergon <sub>` / `ergond <sub>` anywhere in the README's text.
    let readme = read("README.md");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    for bin in ["ergon", "ergond"] {
        let path = target.join("debug").join(bin);
        assert!(
            path.exists(),
            "{} is not built (cargo build --workspace)",
            path.display()
        );
        let help = help_of(&path);
        let needle = format!("`{bin} ");
        for (i, _) in readme.match_indices(&needle) {
            let sub = readme[i + needle.len()..]
                .split(|c: char| !c.is_ascii_alphanumeric() && c != '-')
                .next()
                .unwrap_or("");
            if sub.is_empty() || sub.chars().next().unwrap().is_ascii_uppercase() {
                continue;
            }
            assert!(
                help.lines()
                    .any(|l| l.trim_start().starts_with(&format!("{sub} ")) || l.trim() == sub),
                "README shows `{bin} {sub}`, not a subcommand of {bin}:\n{help}"
            );
        }
    }
}

/// Keys documented in the `| \`key\` |` rows of the part of configuration.md between the
/// headings `from` and `to`.
fn documented(md: &str, from: &str, to: &str) -> BTreeSet<String> {
    let start = md
        .find(from)
        .unwrap_or_else(|| panic!("no {from:?} heading"));
    let end = md[start..].find(to).map_or(md.len(), |e| start + e);
    md[start..end]
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_owned)
        .collect()
}

/// The fields a table accepts, from the parser's own "unknown field" message (serde lists
/// them as "expected one of `a`, `b`, `c`", or "expected `a` or `b`").
fn expected_fields(err: &str) -> BTreeSet<String> {
    let list = err
        .split("expected")
        .nth(1)
        .unwrap_or_else(|| panic!("no field list in {err:?}"));
    list.split('`')
        .skip(1)
        .step_by(2)
        .filter(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .map(str::to_owned)
        .collect()
}

/// Every key a parser accepts, dotted within `sections`.
fn code_keys(parse: &dyn Fn(&str) -> String, sections: &[&str]) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    for f in expected_fields(&parse("zz_not_a_key = 1\n")) {
        if !sections.contains(&f.as_str()) {
            keys.insert(f);
        }
    }
    for s in sections {
        for f in expected_fields(&parse(&format!("[{s}]\nzz_not_a_key = 1\n"))) {
            let key = format!("{s}.{f}");
            // A table within a section (`[meters.hwmon]`) is listed as a section of its own.
            if !sections.contains(&key.as_str()) {
                keys.insert(key);
            }
        }
    }
    keys
}

/// A TOML line setting dotted `key` to a value no key accepts (a table of a table).
fn wrong_type(key: &str) -> String {
    match key.split_once('.') {
        Some((s, k)) => format!("[{s}]\n{k} = {{ zz = {{}} }}\n"),
        None => format!("{key} = {{ zz = {{}} }}\n"),
    }
}

fn check(
    name: &str,
    documented: &BTreeSet<String>,
    code: &BTreeSet<String>,
    parse: &dyn Fn(&str) -> String,
) {
    let missing: Vec<_> = code.difference(documented).collect();
    let extra: Vec<_> = documented.difference(code).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{name}: keys in the code but not in docs/configuration.md: {missing:?}; documented but \
         not in the code: {extra:?}"
    );
    for key in documented {
        let err = parse(&wrong_type(key));
        assert!(
            !err.contains("unknown field"),
            "{name}: documented key {key} is unknown to the parser: {err}"
        );
    }
}

#[test]
fn configuration_md_lists_every_key_and_only_real_ones() {
    let md = read("docs/configuration.md");

    let ergond = |text: &str| match ergond::config::Config::parse(text) {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    };
    let doc = documented(&md, "## `/etc/ergon/ergond.toml`", "\n## ");
    let code = code_keys(
        &ergond,
        &[
            "sampling",
            "attribution",
            "metrics",
            "report",
            "meters",
            "meters.hwmon",
            "meters.pm_counters",
            "meters.redfish",
            "meters.ipmi",
        ],
    );
    assert!(code.len() >= 20, "{code:?}");
    check("ergond.toml", &doc, &code, &ergond);

    let accounting = |text: &str| match ergon_accounting::config::Config::parse(
        text,
        Path::new("accounting.toml"),
    ) {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    };
    let doc = documented(&md, "## `/etc/ergon/accounting.toml`", "\n## The SPANK");
    let code = code_keys(
        &accounting,
        &[
            "state",
            "sacct",
            "retry",
            "records",
            "victoria_metrics",
            "http",
            "carbon",
            "cost",
        ],
    );
    assert!(code.len() >= 20, "{code:?}");
    check("accounting.toml", &doc, &code, &accounting);
}
