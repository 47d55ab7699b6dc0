use std::process::ExitCode;

use super::Global;
use crate::policy::{self, Severity};

pub fn validate(global: &Global) -> ExitCode {
    let paths = global.policy_paths();
    let (pol, mut diags) = policy::load(&paths);
    if !policy::has_errors(&diags) {
        diags.extend(policy::compile(&pol, global.mode).1);
    }
    for d in &diags {
        println!("{d}");
    }
    let errors = diags
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .count();
    let warnings = diags.len() - errors;
    let resources = pol.service_entries.len()
        + pol.sidecars.len()
        + pol.gateways.len()
        + pol.virtual_services.len()
        + pol.destination_rules.len();
    if errors > 0 {
        eprintln!("invalid: {errors} error(s), {warnings} warning(s)");
        ExitCode::from(2)
    } else {
        eprintln!("valid: {resources} resource(s), {warnings} warning(s)");
        ExitCode::SUCCESS
    }
}
