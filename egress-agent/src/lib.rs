//! egress: Istio egress policy enforced in the Linux kernel. The data walks through the modules
//! in this order: `policy` (YAML → Plan, pure), `resolve` (hostnames → addresses), `maps` (Plan →
//! kernel maps), `datapath` (programs loaded and attached), `events` (ring buffer → flow log), `metrics`,
//! `agent` (keeps them in step), `cli`.
pub mod agent;
pub mod cli;
pub mod datapath;
pub mod events;
pub mod glob;
pub mod maps;
pub mod metrics;
pub mod policy;
pub mod relay;
pub mod resolve;
pub mod text;
