//! The files embedded in the shipped Kubernetes manifests (a ConfigMap's
//! `name: |` block scalars), so tests load them with the programs' own
//! loaders and the manifests cannot drift from the code.

use anyhow::{anyhow, Result};

/// The block scalar under `key: |` in `yaml`, without its indentation.
pub fn yaml_block(yaml: &str, key: &str) -> Result<String> {
    let header = format!("{key}: |");
    let mut lines = yaml.lines().skip_while(|l| l.trim() != header);
    let head = lines
        .next()
        .ok_or_else(|| anyhow!("no block scalar {header:?}"))?;
    let indent = head.len() - head.trim_start().len() + 2;
    Ok(lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() >= indent)
        .map(|l| l.get(indent..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_ends_where_the_indentation_does() {
        let yaml = "data:\n  a.toml: |\n    x = 1\n\n    [s]\n    y = 2\n  b: 3\n";
        assert_eq!(yaml_block(yaml, "a.toml").unwrap(), "x = 1\n\n[s]\ny = 2");
        assert!(yaml_block(yaml, "c.toml").is_err());
    }
}
