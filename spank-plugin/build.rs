//! Derives the SPANK `plugin_version` from the installed Slurm's `slurm_version.h`.
//!
//! slurmd refuses a plugin whose `plugin_version` differs from its own version, so the value must
//! come from the headers of the Slurm the plugin is built for, never be hard-coded. The header is
//! looked up in `$SLURM_INCLUDE_DIR` (a site's own Slurm, e.g. `/opt/slurm/include/slurm`), else
//! `/usr/include/slurm` (Debian's `libslurm-dev`). A release the end-to-end tests never ran on
//! builds with a warning (scripts/build-plugin builds one plugin per release).

use std::env;
use std::fs;
use std::path::PathBuf;

/// The Slurm releases the end-to-end tests run on (scripts/test); docs/spank-plugin.md lists them.
const TESTED_RELEASES: &[&str] = &["22.05", "24.11", "26.05"];

fn main() {
    println!("cargo:rerun-if-env-changed=SLURM_INCLUDE_DIR");
    let dir = env::var_os("SLURM_INCLUDE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/include/slurm"));
    let header = dir.join("slurm_version.h");
    println!("cargo:rerun-if-changed={}", header.display());
    let text = fs::read_to_string(&header).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e}. Install your Slurm's development headers (Debian: libslurm-dev, \
             RPM: slurm-devel) or set SLURM_INCLUDE_DIR to the directory that holds slurm_version.h",
            header.display()
        )
    });
    let version = text
        .lines()
        .find_map(|line| {
            let mut words = line.split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some("#define"), Some("SLURM_VERSION_NUMBER"), Some(v)) => Some(v.to_string()),
                _ => None,
            }
        })
        .unwrap_or_else(|| panic!("no SLURM_VERSION_NUMBER in {}", header.display()));
    let number = version
        .strip_prefix("0x")
        .and_then(|hex| u32::from_str_radix(hex, 16).ok())
        .unwrap_or_else(|| {
            panic!(
                "SLURM_VERSION_NUMBER {version:?} in {} is not a hex number",
                header.display()
            )
        });
    let (major, minor) = ((number >> 16) & 0xff, (number >> 8) & 0xff);
    let release = format!("{major}.{minor:02}");
    if !TESTED_RELEASES.contains(&release.as_str()) {
        println!(
            "cargo:warning=building spank_ergon for Slurm {release} ({}): ergon was never tested on \
             this release (tested: {}); run the end-to-end tests or a trial job before relying on it",
            header.display(),
            TESTED_RELEASES.join(", ")
        );
    }
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    fs::write(
        out.join("slurm_version.rs"),
        format!(
            "/// The Slurm version this plugin was built for (`SLURM_VERSION_NUMBER`).\n\
             pub const SLURM_VERSION_NUMBER: u32 = {number:#x};\n"
        ),
    )
    .expect("writing the generated version constant");
}
