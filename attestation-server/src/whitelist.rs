//! The whitelist policy admin API (docs/policy.md): versioned whitelists
//! made of parts, host groups, golden-host import, and the change engine
//! behind every policy change.
//!
//! Every change goes through [`execute`]: it judges the affected hosts'
//! latest genuine evidence against the policy as it will be, and then
//! either reports that (`?dry_run=true`) or stores the change, its CADF
//! event and the new verdicts in one transaction. The dry run and the real
//! change share that code, so they cannot disagree.

use crate::api::{current_trust, detail, valid_host, Body, Caller};
use crate::audit;
use crate::error::Error;
use crate::store::{own_whitelist, ApplyOutcome, HostRecord, PolicyChange, Rejudged};
use crate::tls::Role;
use crate::verify::{self, HostPolicy};
use crate::AppState;
use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use proto::cadf::{self, Resource};
use proto::policy::{
    self, ChangeReport, DiffEntry, GoldenImport, Group, GroupSpec, Membership, Part, Parts,
    VerdictChange, WhitelistSpec, WhitelistSummary, WhitelistVersion, PART_HOST_UNIQUE,
};
use proto::wire::{HostDetail, HostTrust, Whitelist};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Most hosts one membership change may name.
pub const MAX_MEMBERSHIP_HOSTS: usize = 10_000;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/whitelists", get(list).post(create))
        .route(
            "/v1/whitelists/{name}",
            get(show).put(update).delete(remove),
        )
        .route("/v1/whitelists/{name}/versions", get(history))
        .route(
            "/v1/whitelists/{name}/versions/{version}",
            get(show_version),
        )
        .route("/v1/whitelists/{name}/diff", get(diff))
        .route("/v1/whitelists/{name}/golden", post(golden))
        .route("/v1/groups", get(list_groups))
        .route(
            "/v1/groups/{name}",
            get(show_group).put(put_group).delete(delete_group),
        )
        .route("/v1/groups/{name}/hosts", post(members))
        .route(
            "/v1/hosts/{host}/whitelist",
            get(host_whitelist).put(put_host_whitelist),
        )
        .route(
            "/v1/hosts/{host}/whitelist/accept",
            post(accept_host_whitelist),
        )
}

const ADMIN: &[Role] = &[Role::Admin];

/// Query parameters of the change endpoints; unknown ones are refused.
fn params(q: &HashMap<String, String>, allowed: &[&str]) -> Result<(), Error> {
    match q.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(Error::InvalidParameter {
            name: k.clone(),
            problem: format!("unknown parameter; expected one of {}", allowed.join(", ")),
        }),
        None => Ok(()),
    }
}

fn flag(q: &HashMap<String, String>, name: &str) -> Result<bool, Error> {
    match q.get(name).map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") | Some("") => Ok(true),
        Some(other) => Err(Error::InvalidParameter {
            name: name.into(),
            problem: format!("{other:?} is not true or false"),
        }),
    }
}

fn number(q: &HashMap<String, String>, name: &str) -> Result<Option<u32>, Error> {
    q.get(name)
        .map(|v| {
            v.parse().map_err(|_| Error::InvalidParameter {
                name: name.into(),
                problem: format!("{v:?} is not a version number"),
            })
        })
        .transpose()
}

/// Names an admin may create; `host:NAME` whitelists are read-only here
/// (they change through `/v1/hosts/{host}/whitelist`).
fn writable(name: &str) -> Result<(), Error> {
    policy::valid_name(name).map_err(Error::from)
}

fn readable(name: &str) -> Result<(), Error> {
    match name.strip_prefix("host:") {
        Some(host) => valid_host(host),
        None => writable(name),
    }
}

fn whitelist_target(name: &str, version: Option<u32>) -> Resource {
    Resource {
        type_uri: "data/security/policy".into(),
        id: cadf::resource_id("whitelist", name),
        name: Some(match version {
            Some(v) => format!("whitelist {name}@{v}"),
            None => format!("whitelist {name}"),
        }),
    }
}

fn group_target(name: &str, version: Option<u32>) -> Resource {
    Resource {
        type_uri: "data/security/policy".into(),
        id: cadf::resource_id("group", name),
        name: Some(match version {
            Some(v) => format!("host group {name}@{v}"),
            None => format!("host group {name}"),
        }),
    }
}

// ---- the change engine ----

/// A policy change ready to be judged and applied.
struct Proposal {
    change: PolicyChange,
    /// Hosts whose verdict the change may alter.
    affected: Vec<String>,
    /// `whitelist fleet@4`, `group edge@2`, …
    describe: String,
    action: &'static str,
    target: Resource,
    whitelist: Option<WhitelistVersion>,
    group: Option<Group>,
    diff: Vec<DiffEntry>,
}

/// Groups and whitelist heads read while judging, so each is read once.
#[derive(Default)]
struct Lookups {
    groups: HashMap<String, Option<Group>>,
    heads: HashMap<String, Option<WhitelistVersion>>,
}

impl Lookups {
    async fn group(&mut self, st: &AppState, name: &str) -> Result<Option<Group>, Error> {
        if let Some(g) = self.groups.get(name) {
            return Ok(g.clone());
        }
        let g = st.store.group(name).await?;
        self.groups.insert(name.to_string(), g.clone());
        Ok(g)
    }

    async fn head(&mut self, st: &AppState, name: &str) -> Result<Option<WhitelistVersion>, Error> {
        if let Some(w) = self.heads.get(name) {
            return Ok(w.clone());
        }
        let w = st.store.whitelist(name, None).await?;
        self.heads.insert(name.to_string(), w.clone());
        Ok(w)
    }
}

/// The policy that will judge `host` once `change` is applied (the same
/// shape the store's `host_policy` returns, in the same order).
async fn policy_after(
    st: &AppState,
    change: &PolicyChange,
    host: &HostRecord,
    lookups: &mut Lookups,
) -> Result<HostPolicy, Error> {
    let group_name = match change {
        PolicyChange::Members { group, add, .. } if add.contains(&host.name) => Some(group.clone()),
        PolicyChange::Members { group, remove, .. }
            if remove.contains(&host.name) && host.group.as_ref() == Some(group) =>
        {
            None
        }
        _ => host.group.clone(),
    };
    let group = match (&group_name, change) {
        (None, _) => None,
        (Some(n), PolicyChange::PutGroup { group, .. }) if &group.name == n => Some(group.clone()),
        (Some(n), _) => lookups.group(st, n).await?,
    };
    let mut names: Vec<String> = group
        .as_ref()
        .map(|g| g.whitelists.clone())
        .unwrap_or_default();
    names.push(own_whitelist(&host.name));
    let mut whitelists = Vec::new();
    for name in names {
        let w = match change {
            PolicyChange::PutWhitelist { version, .. } if version.name == name => {
                Some(version.clone())
            }
            _ => lookups.head(st, &name).await?,
        };
        whitelists.extend(w.filter(|w| !w.deleted));
    }
    whitelists.sort_by(|a, b| a.name.cmp(&b.name));
    whitelists.dedup_by(|a, b| a.name == b.name);
    Ok(HostPolicy { group, whitelists })
}

/// True when the stored verdict came from genuine evidence: every reason,
/// if any, is a whitelist fault, so `last_pcrs` are that evidence's values.
fn judged_genuine(v: &HostTrust) -> bool {
    v.reasons
        .iter()
        .all(|r| r.step == verify::Step::Whitelist.name())
}

async fn execute(
    st: &AppState,
    caller: &Caller,
    p: Proposal,
    dry_run: bool,
) -> Result<ChangeReport, Error> {
    // A host that attests while the change is judged makes the store answer
    // Stale; judging again then sees its newer evidence.
    for _ in 0..5 {
        if let Some(report) = attempt(st, caller, &p, dry_run).await? {
            return Ok(report);
        }
    }
    Err(Error::PolicyChanging {
        host: p.affected.first().cloned().unwrap_or_default(),
    })
}

/// Judge the affected hosts against the policy as the change makes it, and
/// store it all unless this is a dry run; `None` when a host attested meanwhile.
async fn attempt(
    st: &AppState,
    caller: &Caller,
    p: &Proposal,
    dry_run: bool,
) -> Result<Option<ChangeReport>, Error> {
    let now = Utc::now();
    let mut lookups = Lookups::default();
    let mut rejudged = Vec::new();
    let mut changed = Vec::new();
    for name in &p.affected {
        let Some(rec) = st.store.host(name).await? else {
            continue;
        };
        let (Some(old), Some(pcrs)) = (&rec.verdict, &rec.last_pcrs) else {
            continue;
        };
        if !judged_genuine(old) {
            continue;
        }
        let stored_logs = verify::CheckedLogs::stored(&rec);
        let host_policy = policy_after(st, &p.change, &rec, &mut lookups).await?;
        let j = verify::judge(pcrs, &stored_logs.logs(), &host_policy);
        let new = verify::rejudged(old, j.faults, j.applied);
        let before = current_trust(name, Some(old.clone()), now).trust;
        let after = current_trust(name, Some(new.clone()), now).trust;
        if before != after {
            changed.push(VerdictChange {
                host: name.clone(),
                before,
                after,
                reasons: new.reasons.clone(),
            });
        }
        rejudged.push(Rejudged {
            host: name.clone(),
            verdict: new,
        });
    }
    let report = ChangeReport {
        applied: !dry_run,
        change: p.describe.clone(),
        whitelist: p.whitelist.clone(),
        group: p.group.clone(),
        diff: p.diff.clone(),
        hosts_judged: rejudged.len(),
        changed,
    };
    if dry_run {
        return Ok(Some(report));
    }
    let initiator = audit::client(caller.0.role.as_str(), &caller.0.name);
    let event = audit::event(
        &st.config.name,
        initiator.clone(),
        p.target.clone(),
        p.action,
        "success",
        None,
        now,
        None,
    );
    let refusal = match st
        .store
        .apply_policy_change(&p.change, &p.affected, &rejudged, &event)
        .await?
    {
        ApplyOutcome::Applied => None,
        ApplyOutcome::Stale { host } => {
            tracing::debug!(host, change = %p.describe, "host attested during a policy change; judging again");
            return Ok(None);
        }
        ApplyOutcome::Conflict { current } => Some(conflict(&p.change, current)),
        ApplyOutcome::InUse { by } => Some(in_use(&p.change, by)),
    };
    if let Some(err) = refusal {
        // Nothing changed; the refused attempt is still on the record.
        let ev = audit::event(
            &st.config.name,
            initiator,
            p.target.clone(),
            p.action,
            "failure",
            Some(("policy", err.code())),
            now,
            None,
        );
        st.store.record_event(&ev).await?;
        st.audit_wake.notify_one();
        return Err(err);
    }
    for c in &report.changed {
        st.push.report(&c.host, c.before, c.after, now);
    }
    st.audit_wake.notify_one();
    tracing::info!(
        change = %p.describe,
        hosts_judged = report.hosts_judged,
        trust_changed = report.changed.len(),
        "policy changed"
    );
    Ok(Some(report))
}

fn conflict(change: &PolicyChange, current: Option<u32>) -> Error {
    match change {
        PolicyChange::PutWhitelist {
            version,
            expected_head,
        } => Error::VersionConflict {
            what: "whitelist",
            name: version.name.clone(),
            base: *expected_head,
            current,
        },
        PolicyChange::PutGroup {
            group,
            expected_version,
        } => Error::VersionConflict {
            what: "group",
            name: group.name.clone(),
            base: *expected_version,
            current,
        },
        PolicyChange::DeleteGroup { name } | PolicyChange::Members { group: name, .. } => {
            Error::UnknownGroup(name.clone())
        }
    }
}

fn in_use(change: &PolicyChange, by: Vec<String>) -> Error {
    match change {
        PolicyChange::PutWhitelist { version, .. } => Error::WhitelistInUse {
            name: version.name.clone(),
            groups: by,
        },
        PolicyChange::PutGroup { group, .. } => Error::GroupInUse {
            name: group.name.clone(),
            hosts: by,
        },
        PolicyChange::DeleteGroup { name } | PolicyChange::Members { group: name, .. } => {
            Error::GroupInUse {
                name: name.clone(),
                hosts: by,
            }
        }
    }
}

/// The hosts a whitelist judges: members of the groups that use it, or the
/// host whose own whitelist it is.
async fn hosts_judged_by(st: &AppState, whitelist: &str) -> Result<Vec<String>, Error> {
    if let Some(host) = whitelist.strip_prefix("host:") {
        return Ok(vec![host.to_string()]);
    }
    let mut hosts = Vec::new();
    for g in st.store.groups_using(whitelist).await? {
        if let Some(group) = st.store.group(&g).await? {
            hosts.extend(group.hosts);
        }
    }
    hosts.sort();
    hosts.dedup();
    Ok(hosts)
}

/// A new whitelist version proposal from its parts.
async fn whitelist_proposal(
    st: &AppState,
    caller: &Caller,
    name: &str,
    description: Option<String>,
    parts: Parts,
    head: Option<&WhitelistVersion>,
    deleted: bool,
) -> Result<Proposal, Error> {
    let version = head.map_or(1, |h| h.version.saturating_add(1));
    let previous = head.filter(|h| !h.deleted).map(|h| &h.parts);
    let empty = Parts::new();
    let diff = policy::diff(previous.unwrap_or(&empty), &parts);
    let v = WhitelistVersion {
        name: name.to_string(),
        version,
        description,
        parts,
        deleted,
        created_at: Utc::now(),
        created_by: caller.0.name.clone(),
    };
    Ok(Proposal {
        affected: hosts_judged_by(st, name).await?,
        describe: format!("whitelist {name}@{version}"),
        action: match (head.filter(|h| !h.deleted), deleted) {
            (_, true) => "delete",
            (None, false) => "create",
            (Some(_), false) => "update",
        },
        target: whitelist_target(name, Some(version)),
        change: PolicyChange::PutWhitelist {
            version: v.clone(),
            expected_head: head.map(|h| h.version),
        },
        whitelist: Some(v),
        group: None,
        diff,
    })
}

/// The live head of a whitelist, or 404.
async fn live_head(st: &AppState, name: &str) -> Result<WhitelistVersion, Error> {
    st.store
        .whitelist(name, None)
        .await?
        .filter(|w| !w.deleted)
        .ok_or_else(|| Error::UnknownWhitelist {
            name: name.to_string(),
            version: None,
        })
}

/// The edit must start from the head version.
fn check_base(
    what: &'static str,
    name: &str,
    base: Option<u32>,
    current: u32,
) -> Result<(), Error> {
    match base {
        None => Err(Error::BaseVersionRequired {
            what,
            name: name.to_string(),
            current,
        }),
        Some(b) if b != current => Err(Error::VersionConflict {
            what,
            name: name.to_string(),
            base: Some(b),
            current: Some(current),
        }),
        Some(_) => Ok(()),
    }
}

// ---- whitelists ----

async fn list(
    State(st): State<Arc<AppState>>,
    caller: Caller,
) -> Result<Json<Vec<WhitelistSummary>>, Error> {
    caller.require(ADMIN, "read whitelists")?;
    Ok(Json(st.store.whitelists().await?))
}

async fn create(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
    Body(mut spec): Body<WhitelistSpec>,
) -> Result<Json<ChangeReport>, Error> {
    caller.require(ADMIN, "change whitelists")?;
    params(&q, &["dry_run"])?;
    let dry_run = flag(&q, "dry_run")?;
    policy::normalize_spec(&mut spec)?;
    let name = spec
        .name
        .clone()
        .ok_or_else(|| Error::BadBody("a new whitelist needs a name".into()))?;
    writable(&name)?;
    let head = st.store.whitelist(&name, None).await?;
    if let Some(h) = head.as_ref().filter(|h| !h.deleted) {
        return Err(Error::WhitelistExists {
            name,
            version: h.version,
        });
    }
    let p = whitelist_proposal(
        &st,
        &caller,
        &name,
        spec.description,
        spec.parts,
        head.as_ref(),
        false,
    )
    .await?;
    execute(&st, &caller, p, dry_run).await.map(Json)
}

async fn show(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<WhitelistVersion>, Error> {
    caller.require(ADMIN, "read whitelists")?;
    readable(&name)?;
    live_head(&st, &name).await.map(Json)
}

async fn update(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    Body(mut spec): Body<WhitelistSpec>,
) -> Result<Json<ChangeReport>, Error> {
    caller.require(ADMIN, "change whitelists")?;
    params(&q, &["dry_run"])?;
    let dry_run = flag(&q, "dry_run")?;
    writable(&name)?;
    if spec.name.as_ref().is_some_and(|n| *n != name) {
        return Err(Error::BadBody(format!(
            "the body names whitelist {:?}, the path {name:?}",
            spec.name.unwrap_or_default()
        )));
    }
    policy::normalize_spec(&mut spec)?;
    let head = live_head(&st, &name).await?;
    check_base("whitelist", &name, spec.base_version, head.version)?;
    let p = whitelist_proposal(
        &st,
        &caller,
        &name,
        spec.description,
        spec.parts,
        Some(&head),
        false,
    )
    .await?;
    execute(&st, &caller, p, dry_run).await.map(Json)
}

async fn remove(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<ChangeReport>, Error> {
    caller.require(ADMIN, "change whitelists")?;
    params(&q, &["dry_run", "base_version"])?;
    let dry_run = flag(&q, "dry_run")?;
    writable(&name)?;
    let head = live_head(&st, &name).await?;
    if let Some(base) = number(&q, "base_version")? {
        check_base("whitelist", &name, Some(base), head.version)?;
    }
    let groups = st.store.groups_using(&name).await?;
    if !groups.is_empty() {
        return Err(Error::WhitelistInUse { name, groups });
    }
    let p = whitelist_proposal(&st, &caller, &name, None, Parts::new(), Some(&head), true).await?;
    execute(&st, &caller, p, dry_run).await.map(Json)
}

async fn history(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Vec<WhitelistVersion>>, Error> {
    caller.require(ADMIN, "read whitelists")?;
    readable(&name)?;
    let versions = st.store.whitelist_history(&name).await?;
    if versions.is_empty() {
        return Err(Error::UnknownWhitelist {
            name,
            version: None,
        });
    }
    Ok(Json(versions))
}

async fn version_of(st: &AppState, name: &str, version: u32) -> Result<WhitelistVersion, Error> {
    st.store
        .whitelist(name, Some(version))
        .await?
        .ok_or_else(|| Error::UnknownWhitelist {
            name: name.to_string(),
            version: Some(version),
        })
}

async fn show_version(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<WhitelistVersion>, Error> {
    caller.require(ADMIN, "read whitelists")?;
    readable(&name)?;
    let version: u32 = version.parse().map_err(|_| Error::InvalidParameter {
        name: "version".into(),
        problem: format!("{version:?} is not a version number"),
    })?;
    version_of(&st, &name, version).await.map(Json)
}

/// `GET /v1/whitelists/{name}/diff?from=1&to=2` (`to` defaults to the newest).
async fn diff(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Vec<DiffEntry>>, Error> {
    caller.require(ADMIN, "read whitelists")?;
    readable(&name)?;
    params(&q, &["from", "to"])?;
    let from = number(&q, "from")?.ok_or_else(|| Error::InvalidParameter {
        name: "from".into(),
        problem: "required".into(),
    })?;
    let to = match number(&q, "to")? {
        Some(v) => version_of(&st, &name, v).await?,
        None => st
            .store
            .whitelist(&name, None)
            .await?
            .ok_or_else(|| Error::UnknownWhitelist {
                name: name.clone(),
                version: None,
            })?,
    };
    let from = version_of(&st, &name, from).await?;
    Ok(Json(policy::diff(&from.parts, &to.parts)))
}

/// The PCR values of a host's latest genuine, current evidence.
async fn attesting_pcrs(st: &AppState, host: &str) -> Result<proto::wire::PcrValues, Error> {
    let rec = st
        .store
        .host(host)
        .await?
        .ok_or_else(|| Error::UnknownHost(host.to_string()))?;
    let now = Utc::now();
    let current = rec
        .verdict
        .as_ref()
        .is_some_and(|v| judged_genuine(v) && v.expires_at.is_some_and(|e| now < e));
    match rec.last_pcrs {
        Some(p) if current => Ok(p),
        _ => Err(Error::NoEvidence(host.to_string())),
    }
}

async fn golden(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    Body(req): Body<GoldenImport>,
) -> Result<Json<ChangeReport>, Error> {
    caller.require(ADMIN, "change whitelists")?;
    params(&q, &["dry_run"])?;
    let dry_run = flag(&q, "dry_run")?;
    writable(&name)?;
    valid_host(&req.host)?;
    policy::valid_name(&req.part)?;
    let head = st.store.whitelist(&name, None).await?;
    let live = head.as_ref().filter(|h| !h.deleted);
    match (live, req.base_version) {
        (Some(h), base) => check_base("whitelist", &name, base, h.version)?,
        (None, Some(_)) => {
            return Err(Error::UnknownWhitelist {
                name,
                version: None,
            })
        }
        (None, None) => {}
    }
    let indices: Vec<u8> = match (&req.pcrs, policy::default_pcrs(&req.part)) {
        (Some(list), _) if !list.is_empty() => list.clone(),
        (None, Some(default)) => default.to_vec(),
        _ => {
            return Err(Error::BadBody(format!(
                "part {} has no default PCRs: name them in \"pcrs\"",
                req.part
            )))
        }
    };
    let reported = attesting_pcrs(&st, &req.host).await?;
    let banks: Vec<_> = match &req.banks {
        Some(b) if !b.is_empty() => b.clone(),
        _ => reported.keys().copied().collect(),
    };
    let mut parts = live.map(|h| h.parts.clone()).unwrap_or_default();
    let part = parts.entry(req.part.clone()).or_insert_with(Part::default);
    for bank in banks {
        for index in &indices {
            let value = reported
                .get(&bank)
                .and_then(|b| b.get(index))
                .ok_or_else(|| {
                    Error::BadBody(format!(
                        "host {} did not report PCR {index} of bank {bank}",
                        req.host
                    ))
                })?
                .to_ascii_lowercase();
            let values = part
                .pcrs
                .entry(bank)
                .or_default()
                .entry(*index)
                .or_default();
            if req.replace {
                *values = vec![value];
            } else if !values.contains(&value) {
                values.push(value);
            }
        }
    }
    policy::normalize_parts(&mut parts)?;
    let description = live.and_then(|h| h.description.clone());
    let p = whitelist_proposal(
        &st,
        &caller,
        &name,
        description,
        parts,
        head.as_ref(),
        false,
    )
    .await?;
    execute(&st, &caller, p, dry_run).await.map(Json)
}

// ---- groups ----

async fn list_groups(
    State(st): State<Arc<AppState>>,
    caller: Caller,
) -> Result<Json<Vec<Group>>, Error> {
    caller.require(ADMIN, "read host groups")?;
    Ok(Json(st.store.groups().await?))
}

async fn show_group(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Group>, Error> {
    caller.require(ADMIN, "read host groups")?;
    writable(&name)?;
    st.store
        .group(&name)
        .await?
        .ok_or(Error::UnknownGroup(name))
        .map(Json)
}

async fn put_group(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    Body(spec): Body<GroupSpec>,
) -> Result<Json<ChangeReport>, Error> {
    caller.require(ADMIN, "change host groups")?;
    params(&q, &["dry_run"])?;
    let dry_run = flag(&q, "dry_run")?;
    writable(&name)?;
    policy::validate_group(&spec)?;
    for w in &spec.whitelists {
        live_head(&st, w).await?;
    }
    let existing = st.store.group(&name).await?;
    let (version, hosts) = match (&existing, spec.base_version) {
        (None, None) => (1, Vec::new()),
        (None, Some(_)) => return Err(Error::UnknownGroup(name)),
        (Some(g), base) => {
            check_base("group", &name, base, g.version)?;
            (g.version.saturating_add(1), g.hosts.clone())
        }
    };
    let group = Group {
        name: name.clone(),
        version,
        description: spec.description,
        whitelists: spec.whitelists,
        match_policy: spec.match_policy,
        updated_at: Utc::now(),
        hosts: hosts.clone(),
    };
    let p = Proposal {
        change: PolicyChange::PutGroup {
            group: group.clone(),
            expected_version: existing.as_ref().map(|g| g.version),
        },
        affected: hosts,
        describe: format!("group {name}@{version}"),
        action: if existing.is_some() {
            "update"
        } else {
            "create"
        },
        target: group_target(&name, Some(version)),
        whitelist: None,
        group: Some(group),
        diff: Vec::new(),
    };
    execute(&st, &caller, p, dry_run).await.map(Json)
}

async fn delete_group(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<ChangeReport>, Error> {
    caller.require(ADMIN, "change host groups")?;
    writable(&name)?;
    let g = st
        .store
        .group(&name)
        .await?
        .ok_or_else(|| Error::UnknownGroup(name.clone()))?;
    if !g.hosts.is_empty() {
        return Err(Error::GroupInUse {
            name,
            hosts: g.hosts.into_iter().take(20).collect(),
        });
    }
    let p = Proposal {
        change: PolicyChange::DeleteGroup { name: name.clone() },
        affected: Vec::new(),
        describe: format!("group {name}"),
        action: "delete",
        target: group_target(&name, Some(g.version)),
        whitelist: None,
        group: None,
        diff: Vec::new(),
    };
    execute(&st, &caller, p, false).await.map(Json)
}

/// `POST /v1/groups/{name}/hosts`: `{"add": [...], "remove": [...]}`.
async fn members(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    Body(m): Body<Membership>,
) -> Result<Json<ChangeReport>, Error> {
    caller.require(ADMIN, "change host groups")?;
    params(&q, &["dry_run"])?;
    let dry_run = flag(&q, "dry_run")?;
    writable(&name)?;
    let count = m.add.len() + m.remove.len();
    if count > MAX_MEMBERSHIP_HOSTS {
        return Err(Error::TooMany {
            what: "hosts",
            count,
            max: MAX_MEMBERSHIP_HOSTS,
        });
    }
    let group = st
        .store
        .group(&name)
        .await?
        .ok_or_else(|| Error::UnknownGroup(name.clone()))?;
    for h in m.add.iter().chain(&m.remove) {
        valid_host(h)?;
        if m.add.contains(h) && m.remove.contains(h) {
            return Err(Error::BadBody(format!(
                "host {h} is both added and removed"
            )));
        }
        if st.store.host(h).await?.is_none() {
            return Err(Error::UnknownHost(h.clone()));
        }
    }
    let mut affected: Vec<String> = m.add.iter().chain(&m.remove).cloned().collect();
    affected.sort();
    affected.dedup();
    let mut hosts_after: Vec<String> = group
        .hosts
        .iter()
        .filter(|h| !m.remove.contains(h))
        .cloned()
        .collect();
    hosts_after.extend(m.add.iter().filter(|h| !group.hosts.contains(h)).cloned());
    hosts_after.sort();
    hosts_after.dedup();
    let p = Proposal {
        change: PolicyChange::Members {
            group: name.clone(),
            add: m.add,
            remove: m.remove,
        },
        affected,
        describe: format!("members of group {name}"),
        action: "update",
        target: group_target(&name, Some(group.version)),
        whitelist: None,
        group: Some(Group {
            hosts: hosts_after,
            ..group
        }),
        diff: Vec::new(),
    };
    execute(&st, &caller, p, dry_run).await.map(Json)
}

// ---- a host's own whitelist (the original per-host API) ----

/// All parts of a whitelist merged into one PCR table.
pub fn merged(parts: &Parts) -> Whitelist {
    let mut pcrs: proto::wire::PcrWhitelist = BTreeMap::new();
    for part in parts.values() {
        for (bank, indices) in &part.pcrs {
            for (index, values) in indices {
                let out = pcrs.entry(*bank).or_default().entry(*index).or_default();
                for v in values {
                    if !out.contains(v) {
                        out.push(v.clone());
                    }
                }
            }
        }
    }
    Whitelist { pcrs }
}

/// The host's own whitelist, merged, if it has one.
pub async fn own(st: &AppState, host: &str) -> Result<Option<Whitelist>, Error> {
    Ok(st
        .store
        .whitelist(&own_whitelist(host), None)
        .await?
        .filter(|w| !w.deleted)
        .map(|w| merged(&w.parts)))
}

async fn host_whitelist(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    Path(host): Path<String>,
) -> Result<Json<Whitelist>, Error> {
    caller.require(ADMIN, "read whitelists")?;
    valid_host(&host)?;
    known(&st, &host).await?;
    Ok(Json(own(&st, &host).await?.unwrap_or_default()))
}

async fn known(st: &AppState, host: &str) -> Result<HostRecord, Error> {
    st.store
        .host(host)
        .await?
        .ok_or_else(|| Error::UnknownHost(host.to_string()))
}

/// Replace the host's own whitelist with a new version (last writer wins,
/// as this API always did; versions are kept).
async fn set_own(
    st: &AppState,
    caller: &Caller,
    host: &str,
    wl: Whitelist,
) -> Result<Json<HostDetail>, Error> {
    known(st, host).await?;
    let mut parts = Parts::from([(PART_HOST_UNIQUE.to_string(), Part::of_pcrs(wl.pcrs))]);
    policy::normalize_parts(&mut parts)?;
    let name = own_whitelist(host);
    let head = st.store.whitelist(&name, None).await?;
    let p = whitelist_proposal(st, caller, &name, None, parts, head.as_ref(), false).await?;
    execute(st, caller, p, false).await?;
    detail(st, host).await.map(Json)
}

async fn put_host_whitelist(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    Path(host): Path<String>,
    Body(wl): Body<Whitelist>,
) -> Result<Json<HostDetail>, Error> {
    caller.require(ADMIN, "change whitelists")?;
    valid_host(&host)?;
    set_own(&st, &caller, &host, wl).await
}

async fn accept_host_whitelist(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    Path(host): Path<String>,
) -> Result<Json<HostDetail>, Error> {
    caller.require(ADMIN, "change whitelists")?;
    valid_host(&host)?;
    let r = known(&st, &host).await?;
    let pcrs = r.last_pcrs.ok_or_else(|| Error::NoEvidence(host.clone()))?;
    let wl = Whitelist {
        pcrs: pcrs
            .into_iter()
            .map(|(bank, values)| {
                (
                    bank,
                    values.into_iter().map(|(i, v)| (i, vec![v])).collect(),
                )
            })
            .collect(),
    };
    set_own(&st, &caller, &host, wl).await
}
