//! The InfluxDB line protocol's escaping, shared by the record lines (`sinks`) and the usage
//! counters (`usage`): a leaf, so that neither has to import the other for it.

/// A tag value escaped for the line protocol.
pub fn escape_tag(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if matches!(c, ',' | '=' | ' ' | '\\') {
            out.push('\\');
        }
        if c == '\n' {
            out.push(' ');
        } else {
            out.push(c);
        }
    }
    out
}
