#![no_std]
// The library target lets egress-agent declare this crate as a build dependency, so cargo
// rebuilds the agent when it changes.
