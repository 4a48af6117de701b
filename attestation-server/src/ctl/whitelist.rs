//! `attestctl whitelist …` and `attestctl group …`: the policy admin API
//! from the command line (docs/policy.md). Every change verb takes
//! `--dry-run`, which prints which hosts would change verdict and why.

use super::CtlError;
use clap::Subcommand;
use proto::bootpolicy::BootPolicy;
use proto::client::ApiClient;
use proto::policy::{
    self, ChangeReport, GoldenImport, Group, GroupSpec, MatchPolicy, Membership, WhitelistSpec,
    WhitelistSummary, WhitelistVersion,
};
use proto::tpm::HashAlg;
use proto::wire::{HostDetail, Whitelist};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Subcommand)]
pub enum WhitelistCommand {
    /// List every whitelist with its newest version and the groups using it.
    List,
    /// Print a whitelist version (the newest by default) in the export format.
    Get {
        name: String,
        #[arg(long)]
        version: Option<u32>,
    },
    /// Every version of a whitelist, oldest first.
    History { name: String },
    /// What changed between two versions (TO defaults to the newest).
    Diff {
        name: String,
        from: u32,
        to: Option<u32>,
    },
    /// Write a whitelist version to FILE (the format `import` reads).
    Export {
        name: String,
        #[arg(long)]
        version: Option<u32>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Create a whitelist from FILE, or make a new version of an existing one
    /// (then --base-version is required). FILE is an export or a spec
    /// (`{"name", "description", "parts"}`).
    Import {
        file: PathBuf,
        /// The whitelist's name (default: the name in FILE).
        #[arg(long)]
        name: Option<String>,
        /// The version this import replaces (optimistic concurrency).
        #[arg(long)]
        base_version: Option<u32>,
        #[arg(long)]
        dry_run: bool,
    },
    /// Make a whitelist part from Keylime's tpm_policy JSON
    /// (`{"mask": "0x…", "PCR": ["hex", …]}`).
    ImportKeylime {
        name: String,
        #[arg(long)]
        file: PathBuf,
        /// The part the PCRs go to.
        #[arg(long)]
        part: String,
        /// The bank Keylime's values are for.
        #[arg(long, default_value = "sha256")]
        bank: String,
        #[arg(long)]
        base_version: Option<u32>,
        #[arg(long)]
        dry_run: bool,
    },
    /// Put a boot policy and/or a runtime (IMA) policy into one part of a
    /// whitelist, as a new version; the part's PCR values and the other
    /// parts of --base-version are kept.
    SetPolicy {
        name: String,
        #[arg(long)]
        part: String,
        /// A boot policy (JSON, e.g. from `attestctl policy from-eventlog`).
        #[arg(long)]
        boot: Option<PathBuf>,
        /// A runtime policy as it is: ours (JSON), Keylime's runtime-policy
        /// JSON, or a flat `digest  path` allowlist (detected from the content).
        #[arg(long)]
        runtime: Option<PathBuf>,
        /// The version this change builds on; omit to create the whitelist.
        #[arg(long)]
        base_version: Option<u32>,
        #[arg(long)]
        dry_run: bool,
    },
    /// Make a new version from the PCR values a currently attesting host reports.
    Golden {
        name: String,
        #[arg(long)]
        host: String,
        #[arg(long)]
        part: String,
        /// PCR indices, e.g. 0,1,2 (default by part: platform 0-7, os 8-9, runtime 10).
        #[arg(long, value_delimiter = ',')]
        pcrs: Vec<u8>,
        /// Banks, e.g. sha256 (default: every bank the host reports).
        #[arg(long, value_delimiter = ',')]
        banks: Vec<String>,
        /// Replace the part's values instead of adding the host's.
        #[arg(long)]
        replace: bool,
        /// The version this change builds on; omit to create the whitelist.
        #[arg(long)]
        base_version: Option<u32>,
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete a whitelist (refused while a group uses it); versions stay readable.
    Delete {
        name: String,
        #[arg(long)]
        base_version: Option<u32>,
        #[arg(long)]
        dry_run: bool,
    },
    /// Print a host's own whitelist.
    Show { host: String },
    /// Replace a host's own whitelist with the JSON in FILE (`{"pcrs": …}`).
    Set { host: String, file: PathBuf },
    /// Accept the host's last verified PCR values as its own whitelist.
    Accept { host: String },
}

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    List,
    /// A group with its whitelists, match policy and hosts.
    Show {
        name: String,
    },
    /// Create a group or change its whitelists and match policy.
    Set {
        name: String,
        /// Whitelist names (repeat or comma-separate).
        #[arg(long = "whitelist", value_delimiter = ',')]
        whitelists: Vec<String>,
        /// Parts that must be defined and match (others: judged where defined).
        #[arg(long = "require", value_delimiter = ',')]
        required: Vec<String>,
        #[arg(long)]
        description: Option<String>,
        /// The version this change replaces; omit to create.
        #[arg(long)]
        base_version: Option<u32>,
        #[arg(long)]
        dry_run: bool,
    },
    /// Move hosts into the group.
    Add {
        name: String,
        hosts: Vec<String>,
        #[arg(long)]
        dry_run: bool,
    },
    /// Take hosts out of the group.
    Remove {
        name: String,
        hosts: Vec<String>,
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete an empty group.
    Delete {
        name: String,
    },
}

fn read(path: &Path) -> Result<String, CtlError> {
    std::fs::read_to_string(path).map_err(|e| CtlError::Input {
        path: path.display().to_string(),
        detail: e.to_string(),
    })
}

fn bad_input(path: &Path, detail: impl ToString) -> CtlError {
    CtlError::Input {
        path: path.display().to_string(),
        detail: detail.to_string(),
    }
}

fn json<T: serde::Serialize>(v: T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or_default()
}

fn dry(dry_run: bool) -> &'static str {
    if dry_run {
        "?dry_run=true"
    } else {
        ""
    }
}

fn bank(name: &str) -> Result<HashAlg, CtlError> {
    serde_json::from_value(serde_json::Value::String(name.to_string())).map_err(|_| {
        CtlError::Input {
            path: "--bank".into(),
            detail: format!("{name:?} is not one of sha1, sha256, sha384, sha512"),
        }
    })
}

/// A whitelist file: an export (`WhitelistVersion`) or a spec.
pub fn parse_whitelist_file(path: &Path, text: &str) -> Result<WhitelistSpec, CtlError> {
    if let Ok(v) = serde_json::from_str::<WhitelistVersion>(text) {
        return Ok(WhitelistSpec {
            name: Some(v.name),
            description: v.description,
            parts: v.parts,
            base_version: None,
        });
    }
    serde_json::from_str::<WhitelistSpec>(text).map_err(|e| bad_input(path, e))
}

/// Create `spec` as a new whitelist, or a new version on `base_version`.
async fn put_spec(
    api: &ApiClient,
    name: &str,
    mut spec: WhitelistSpec,
    base_version: Option<u32>,
    dry_run: bool,
) -> Result<ChangeReport, CtlError> {
    spec.name = Some(name.to_string());
    Ok(match base_version {
        None => {
            spec.base_version = None;
            api.post(&format!("/v1/whitelists{}", dry(dry_run)), &spec)
                .await?
        }
        Some(b) => {
            spec.base_version = Some(b);
            api.put(&format!("/v1/whitelists/{name}{}", dry(dry_run)), &spec)
                .await?
        }
    })
}

/// A spec for the next version of `name`: its description and parts at
/// `base_version`, or an empty one for a new whitelist.
async fn next_spec(
    api: &ApiClient,
    name: &str,
    base_version: Option<u32>,
) -> Result<WhitelistSpec, CtlError> {
    let (description, parts) = match base_version {
        Some(v) => {
            let base = get_version(api, name, Some(v)).await?;
            (base.description, base.parts)
        }
        None => (None, BTreeMap::new()),
    };
    Ok(WhitelistSpec {
        name: Some(name.to_string()),
        description,
        parts,
        base_version: None,
    })
}

/// A boot policy file, validated.
fn load_boot_policy(path: &Path) -> Result<BootPolicy, CtlError> {
    let boot: BootPolicy = serde_json::from_str(&read(path)?).map_err(|e| bad_input(path, e))?;
    boot.validate()
        .map_err(|e| bad_input(path, format!("boot_policy_invalid: {e}")))?;
    Ok(boot)
}

async fn get_version(
    api: &ApiClient,
    name: &str,
    version: Option<u32>,
) -> Result<WhitelistVersion, CtlError> {
    Ok(match version {
        Some(v) => {
            api.get(&format!("/v1/whitelists/{name}/versions/{v}"))
                .await?
        }
        None => api.get(&format!("/v1/whitelists/{name}")).await?,
    })
}

pub async fn run_whitelist(
    api: &ApiClient,
    cmd: WhitelistCommand,
) -> Result<serde_json::Value, CtlError> {
    use WhitelistCommand::*;
    Ok(match cmd {
        List => json(api.get::<Vec<WhitelistSummary>>("/v1/whitelists").await?),
        Get { name, version } => json(get_version(api, &name, version).await?),
        History { name } => json(
            api.get::<Vec<WhitelistVersion>>(&format!("/v1/whitelists/{name}/versions"))
                .await?,
        ),
        Diff { name, from, to } => {
            let a = get_version(api, &name, Some(from)).await?;
            let b = get_version(api, &name, to).await?;
            serde_json::json!({
                "name": name,
                "from": a.version,
                "to": b.version,
                "changes": policy::diff(&a.parts, &b.parts),
            })
        }
        Export { name, version, out } => {
            let v = get_version(api, &name, version).await?;
            let text = serde_json::to_string_pretty(&v).unwrap_or_default();
            std::fs::write(&out, text + "\n").map_err(|e| bad_input(&out, e))?;
            serde_json::json!({"name": v.name, "version": v.version, "out": out})
        }
        Import {
            file,
            name,
            base_version,
            dry_run,
        } => {
            let spec = parse_whitelist_file(&file, &read(&file)?)?;
            let name = name
                .or_else(|| spec.name.clone())
                .ok_or_else(|| bad_input(&file, "the file names no whitelist; pass --name"))?;
            json(put_spec(api, &name, spec, base_version, dry_run).await?)
        }
        ImportKeylime {
            name,
            file,
            part,
            bank: b,
            base_version,
            dry_run,
        } => {
            let imported = policy::part_from_keylime_tpm_policy(&read(&file)?, bank(&b)?)
                .map_err(|e| bad_input(&file, e))?;
            // Replace that one part of the current version, keep the others.
            let mut spec = next_spec(api, &name, base_version).await?;
            spec.parts.insert(part, imported);
            json(put_spec(api, &name, spec, base_version, dry_run).await?)
        }
        SetPolicy {
            name,
            part,
            boot,
            runtime,
            base_version,
            dry_run,
        } => {
            if boot.is_none() && runtime.is_none() {
                return Err(CtlError::Input {
                    path: "--boot, --runtime".into(),
                    detail: "give a boot policy, a runtime policy or both".into(),
                });
            }
            // Both files are read and checked before any call.
            let boot = boot.as_deref().map(load_boot_policy).transpose()?;
            let runtime = runtime
                .as_deref()
                .map(|f| super::ima::load_policy(f).map(|(_, p)| p))
                .transpose()?;
            let mut spec = next_spec(api, &name, base_version).await?;
            let target = spec.parts.entry(part).or_default();
            if let Some(b) = boot {
                target.boot = Some(Box::new(b));
            }
            if let Some(r) = runtime {
                target.runtime = Some(r);
            }
            json(put_spec(api, &name, spec, base_version, dry_run).await?)
        }
        Golden {
            name,
            host,
            part,
            pcrs,
            banks,
            replace,
            base_version,
            dry_run,
        } => {
            let req = GoldenImport {
                host,
                part,
                pcrs: (!pcrs.is_empty()).then_some(pcrs),
                banks: if banks.is_empty() {
                    None
                } else {
                    Some(banks.iter().map(|b| bank(b)).collect::<Result<_, _>>()?)
                },
                replace,
                base_version,
            };
            json(
                api.post::<_, ChangeReport>(
                    &format!("/v1/whitelists/{name}/golden{}", dry(dry_run)),
                    &req,
                )
                .await?,
            )
        }
        Delete {
            name,
            base_version,
            dry_run,
        } => {
            let mut query = Vec::new();
            if dry_run {
                query.push("dry_run=true".to_string());
            }
            if let Some(b) = base_version {
                query.push(format!("base_version={b}"));
            }
            let q = if query.is_empty() {
                String::new()
            } else {
                format!("?{}", query.join("&"))
            };
            json(
                api.delete::<ChangeReport>(&format!("/v1/whitelists/{name}{q}"))
                    .await?,
            )
        }
        Show { host } => json(
            api.get::<Whitelist>(&format!("/v1/hosts/{host}/whitelist"))
                .await?,
        ),
        Set { host, file } => {
            let wl: Whitelist =
                serde_json::from_str(&read(&file)?).map_err(|e| bad_input(&file, e))?;
            json(
                api.put::<_, HostDetail>(&format!("/v1/hosts/{host}/whitelist"), &wl)
                    .await?,
            )
        }
        Accept { host } => json(
            api.post::<_, HostDetail>(
                &format!("/v1/hosts/{host}/whitelist/accept"),
                &serde_json::json!({}),
            )
            .await?,
        ),
    })
}

pub async fn run_group(api: &ApiClient, cmd: GroupCommand) -> Result<serde_json::Value, CtlError> {
    use GroupCommand::*;
    Ok(match cmd {
        List => json(api.get::<Vec<Group>>("/v1/groups").await?),
        Show { name } => json(api.get::<Group>(&format!("/v1/groups/{name}")).await?),
        Set {
            name,
            whitelists,
            required,
            description,
            base_version,
            dry_run,
        } => {
            let spec = GroupSpec {
                description,
                whitelists,
                match_policy: required
                    .into_iter()
                    .map(|p| (p, MatchPolicy::Required))
                    .collect(),
                base_version,
            };
            json(
                api.put::<_, ChangeReport>(&format!("/v1/groups/{name}{}", dry(dry_run)), &spec)
                    .await?,
            )
        }
        Add {
            name,
            hosts,
            dry_run,
        } => json(
            api.post::<_, ChangeReport>(
                &format!("/v1/groups/{name}/hosts{}", dry(dry_run)),
                &Membership {
                    add: hosts,
                    remove: Vec::new(),
                },
            )
            .await?,
        ),
        Remove {
            name,
            hosts,
            dry_run,
        } => json(
            api.post::<_, ChangeReport>(
                &format!("/v1/groups/{name}/hosts{}", dry(dry_run)),
                &Membership {
                    add: Vec::new(),
                    remove: hosts,
                },
            )
            .await?,
        ),
        Delete { name } => json(
            api.delete::<ChangeReport>(&format!("/v1/groups/{name}"))
                .await?,
        ),
    })
}
