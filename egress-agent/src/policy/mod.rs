//! From Istio YAML to a [`Plan`]: `load` parses (with positions), `compile` decides. Nothing here
//! touches the kernel or the network, so all of it is unit-tested without root.
pub mod compile;
pub mod load;
pub mod node;
pub mod schema;
pub mod tls;

use std::path::PathBuf;

pub use compile::{Decision, Entry, HostRule, Plan, RuleIds, RuleInfo, compile, compile_after};
pub use load::{Diagnostic, Severity, load, load_str};
use node::Pos;
use schema::{DestinationRuleSpec, GatewaySpec, ServiceEntrySpec, SidecarSpec, VirtualServiceSpec};

/// Where a resource was defined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub file: PathBuf,
    pub pos: Pos,
}

#[derive(Debug, Clone)]
pub struct Resource<S> {
    pub kind: String,
    pub name: String,
    pub namespace: String,
    pub source: Source,
    pub spec: S,
}

impl<S> Resource<S> {
    /// `Kind/namespace/name`, the rule label in output and events.
    pub fn label(&self) -> String {
        format!("{}/{}/{}", self.kind, self.namespace, self.name)
    }
}

/// Every resource read from the policy files.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub service_entries: Vec<Resource<ServiceEntrySpec>>,
    pub sidecars: Vec<Resource<SidecarSpec>>,
    pub gateways: Vec<Resource<GatewaySpec>>,
    pub virtual_services: Vec<Resource<VirtualServiceSpec>>,
    pub destination_rules: Vec<Resource<DestinationRuleSpec>>,
}

/// Outbound traffic mode, as Istio's `outboundTrafficPolicy.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    AllowAny,
    RegistryOnly,
}

impl Mode {
    pub fn kernel(self) -> egress_common::Mode {
        match self {
            Mode::AllowAny => egress_common::Mode::AllowAny,
            Mode::RegistryOnly => egress_common::Mode::RegistryOnly,
        }
    }

    /// A flow record's `reason` when the mode decided.
    pub fn reason(self) -> &'static str {
        match self {
            Mode::AllowAny => "mode allow-any",
            Mode::RegistryOnly => "mode registry-only",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            Mode::AllowAny => "allow-any",
            Mode::RegistryOnly => "registry-only",
        })
    }
}

/// Diagnostics hold an error.
pub fn has_errors(diags: &[Diagnostic]) -> bool {
    diags.iter().any(|d| d.severity == Severity::Error)
}

#[cfg(test)]
pub(crate) mod tests;
