//! Reading policy files: files and directories, multi-document streams, `kind: List` exports.
//! Every problem becomes a [`Diagnostic`] with file, line and column; loading never stops at the
//! first one, so `validate` can show them all.
use std::{
    fmt, fs,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use super::{
    Policy, Resource, Source,
    node::{Kind, Node, NodeError, Pos},
    schema::{DestinationRuleSpec, GatewaySpec, ServiceEntrySpec, SidecarSpec, VirtualServiceSpec},
};

/// Policy files are untrusted input; anything larger than this is refused unread.
const MAX_FILE_BYTES: u64 = 16 << 20;

const ISTIO_NETWORKING: [&str; 3] = [
    "networking.istio.io/v1alpha3",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub file: PathBuf,
    pub pos: Pos,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        if self.pos.line == 0 {
            write!(f, "{}: {sev}: {}", self.file.display(), self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {sev}: {}",
                self.file.display(),
                self.pos.line,
                self.pos.col,
                self.message
            )
        }
    }
}

/// Collects diagnostics for one file.
pub(super) struct Report<'a> {
    pub file: &'a Path,
    pub out: &'a mut Vec<Diagnostic>,
}

impl Report<'_> {
    pub fn error(&mut self, pos: Pos, message: impl Into<String>) {
        self.push(Severity::Error, pos, message.into());
    }
    pub fn warn(&mut self, pos: Pos, message: impl Into<String>) {
        self.push(Severity::Warning, pos, message.into());
    }
    fn push(&mut self, severity: Severity, pos: Pos, message: String) {
        self.out.push(Diagnostic {
            severity,
            file: self.file.to_owned(),
            pos,
            message,
        });
    }
}

/// Loads every policy file under `paths`. The policy is usable only if no diagnostic is an error.
pub fn load(paths: &[PathBuf]) -> (Policy, Vec<Diagnostic>) {
    let mut policy = Policy::default();
    let mut diags = Vec::new();
    for path in paths {
        let files = match policy_files(path) {
            Ok(files) => files,
            Err(e) => {
                Report {
                    file: path,
                    out: &mut diags,
                }
                .error(Pos::default(), e);
                continue;
            }
        };
        for file in files {
            let mut report = Report {
                file: &file,
                out: &mut diags,
            };
            match read_text(&file) {
                Ok(text) => load_text(&text, &file, &mut policy, &mut report),
                Err(e) => report.error(Pos::default(), e),
            }
        }
    }
    (policy, diags)
}

/// Parses one file's text into `policy`.
pub fn load_str(text: &str, file: &Path) -> (Policy, Vec<Diagnostic>) {
    let mut policy = Policy::default();
    let mut diags = Vec::new();
    load_text(
        text,
        file,
        &mut policy,
        &mut Report {
            file,
            out: &mut diags,
        },
    );
    (policy, diags)
}

fn read_text(file: &Path) -> Result<String, String> {
    let meta = fs::metadata(file).map_err(|e| format!("cannot read: {e}"))?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(format!(
            "file is {} bytes, more than the {MAX_FILE_BYTES} a policy file may have",
            meta.len()
        ));
    }
    let bytes = fs::read(file).map_err(|e| format!("cannot read: {e}"))?;
    String::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))
}

/// A file as itself; a directory as the YAML files under it, recursively, in name order.
fn policy_files(path: &Path) -> Result<Vec<PathBuf>, String> {
    let meta = fs::metadata(path).map_err(|e| format!("cannot read policy path: {e}"))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    let mut dirs = vec![path.to_owned()];
    while let Some(dir) = dirs.pop() {
        let entries =
            fs::read_dir(&dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
            let p = entry.path();
            if p.is_dir() {
                dirs.push(p);
            } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
                files.push(p);
            }
        }
    }
    files.sort();
    Ok(files)
}

fn load_text(text: &str, file: &Path, policy: &mut Policy, report: &mut Report) {
    match Node::parse_documents(text) {
        Ok(docs) => {
            for doc in &docs {
                load_object(doc, file, policy, report);
            }
        }
        Err(e) => {
            let pos = e
                .location()
                .map(|l| Pos {
                    line: l.line() as u32,
                    col: l.column() as u32,
                })
                .unwrap_or_default();
            let message = e.without_snippet().to_string();
            report.error(pos, format!("invalid YAML: {}", first_line(&message)));
        }
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

fn load_object(obj: &Node, file: &Path, policy: &mut Policy, report: &mut Report) {
    match &obj.kind {
        Kind::Null => return,
        Kind::Map(_) => {}
        _ => {
            report.error(
                obj.pos,
                "expected a Kubernetes object (a mapping with `kind`)",
            );
            return;
        }
    }
    let Some(kind) = obj.get("kind").and_then(Node::as_str) else {
        report.error(obj.pos, "missing `kind`");
        return;
    };
    let api_version = obj.get("apiVersion").and_then(Node::as_str).unwrap_or("");
    if kind == "List" {
        match obj.get("items").map(|n| &n.kind) {
            Some(Kind::Seq(items)) => {
                for item in items {
                    load_object(item, file, policy, report);
                }
            }
            Some(Kind::Null) | None => {}
            Some(_) => report.error(obj.pos, "`items` of a List must be a list"),
        }
        return;
    }
    let known = matches!(
        kind,
        "ServiceEntry" | "Sidecar" | "Gateway" | "VirtualService" | "DestinationRule"
    );
    if !known {
        report.warn(
            obj.pos,
            format!("kind `{kind}` ({api_version}) is not enforced by egress; ignored"),
        );
        return;
    }
    if !ISTIO_NETWORKING.contains(&api_version) {
        // An ignored Sidecar could silently turn registry-only into allow-any: refuse instead.
        report.error(
            obj.get("apiVersion").map_or(obj.pos, |n| n.pos),
            format!(
                "{kind} needs apiVersion {}, not `{api_version}`",
                ISTIO_NETWORKING.join(", ")
            ),
        );
        return;
    }
    if let Kind::Map(entries) = &obj.kind {
        for (key, _) in entries {
            if !matches!(
                key.name.as_str(),
                "apiVersion" | "kind" | "metadata" | "spec" | "status"
            ) {
                report.warn(key.pos, format!("unknown field `{}`; ignored", key.name));
            }
        }
    }
    let metadata = obj.get("metadata");
    let Some(name) = metadata.and_then(|m| m.get("name")).and_then(Node::as_str) else {
        report.error(
            metadata.map_or(obj.pos, |m| m.pos),
            format!("{kind} has no metadata.name"),
        );
        return;
    };
    let namespace = metadata
        .and_then(|m| m.get("namespace"))
        .and_then(Node::as_str)
        .unwrap_or("default");
    let Some(spec) = obj.get("spec") else {
        report.error(obj.pos, format!("{kind} `{name}` has no spec"));
        return;
    };
    let source = Source {
        file: file.to_owned(),
        pos: obj.pos,
    };
    fn resource<S>(
        kind: &str,
        name: &str,
        namespace: &str,
        source: &Source,
        spec: S,
    ) -> Resource<S> {
        Resource {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            kind: kind.to_owned(),
            source: source.clone(),
            spec,
        }
    }
    match kind {
        "ServiceEntry" => {
            if let Some(s) = read_spec::<ServiceEntrySpec>(spec, SERVICE_ENTRY_UNAPPLIED, report) {
                policy
                    .service_entries
                    .push(resource(kind, name, namespace, &source, s));
            }
        }
        "Sidecar" => {
            if let Some(s) = read_spec::<SidecarSpec>(spec, SIDECAR_UNAPPLIED, report) {
                policy
                    .sidecars
                    .push(resource(kind, name, namespace, &source, s));
            }
        }
        "Gateway" => {
            if let Some(s) = read_spec::<GatewaySpec>(spec, GATEWAY_UNAPPLIED, report) {
                policy
                    .gateways
                    .push(resource(kind, name, namespace, &source, s));
            }
        }
        "VirtualService" => {
            if let Some(s) =
                read_spec::<VirtualServiceSpec>(spec, VIRTUAL_SERVICE_UNAPPLIED, report)
            {
                policy
                    .virtual_services
                    .push(resource(kind, name, namespace, &source, s));
            }
        }
        "DestinationRule" => {
            if let Some(s) =
                read_spec::<DestinationRuleSpec>(spec, DESTINATION_RULE_UNAPPLIED, report)
            {
                policy
                    .destination_rules
                    .push(resource(kind, name, namespace, &source, s));
            }
        }
        _ => unreachable!("kind checked above"),
    }
}

/// Istio fields that the schema reads and egress leaves, by kind: named as such, not as unknown
/// fields (by their name, wherever the spec has them).
const SERVICE_ENTRY_UNAPPLIED: &[&str] = &[
    "workloadSelector",
    "network",
    "locality",
    "weight",
    "serviceAccount",
];
const SIDECAR_UNAPPLIED: &[&str] = &[
    "workloadSelector",
    "ingress",
    "egress",
    "inboundConnectionPool",
    "egressProxy",
];
const GATEWAY_UNAPPLIED: &[&str] = &["tls", "bind", "defaultEndpoint"];
const VIRTUAL_SERVICE_UNAPPLIED: &[&str] = &[
    "delegate",
    "derivePort",
    "bytes",
    "corsPolicy",
    "sourceLabels",
    "sourceNamespace",
    "sourceSubnet",
    "statPrefix",
    "retryRemoteLocalities",
];
const DESTINATION_RULE_UNAPPLIED: &[&str] = &[
    "workloadSelector",
    "ringHash",
    "maglev",
    "minimumRingSize",
    "localityLbSetting",
    "warmupDurationSecs",
    "warmup",
    "consecutiveErrors",
    "tunnel",
    "proxyProtocol",
    "retryBudget",
];

/// Deserializes a spec, warning about every field the schema does not know, and about those
/// (`unapplied`) that it knows and egress does not apply.
fn read_spec<T: for<'de> Deserialize<'de>>(
    spec: &Node,
    unapplied: &[&str],
    report: &mut Report,
) -> Option<T> {
    let mut unknown = Vec::new();
    let result: Result<T, NodeError> = serde_ignored::deserialize(spec, |path| {
        unknown.push(segments(&path));
    });
    for segs in unknown {
        let pos = spec.locate(&segs).unwrap_or(spec.pos);
        let mut path = spec.path.clone();
        for s in &segs {
            if s.chars().all(|c| c.is_ascii_digit()) {
                path.push_str(&format!("[{s}]"));
            } else {
                path.push('.');
                path.push_str(s);
            }
        }
        let message = match segs.last() {
            Some(name) if unapplied.contains(&name.as_str()) => {
                format!("`{path}` is not applied by egress; ignored")
            }
            _ => format!("unknown field `{path}`; ignored"),
        };
        report.warn(pos, message);
    }
    match result {
        Ok(v) => Some(v),
        Err(e) => {
            report.error(e.pos, e.to_string());
            None
        }
    }
}

fn segments(path: &serde_ignored::Path) -> Vec<String> {
    use serde_ignored::Path as P;
    let mut out = Vec::new();
    let mut cur = path;
    loop {
        match cur {
            P::Root => break,
            P::Seq { parent, index } => {
                out.push(index.to_string());
                cur = parent;
            }
            P::Map { parent, key } => {
                out.push(key.clone());
                cur = parent;
            }
            P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
                cur = parent;
            }
        }
    }
    out.reverse();
    out
}
