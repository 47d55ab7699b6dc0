//! Flow events: from the kernel's ring buffer, annotated with what only the agent knows, to a
//! JSON-lines log; and reading that log back.
mod catalog;
pub mod log;
mod pipeline;
mod priority;
mod record;

pub use catalog::{Catalog, CgroupNames, Upstream, draw, host_matches};
pub use log::{LogReader, LogWriter, Rotation};
pub use pipeline::{DRAIN_INTERVAL, Pipeline, Records, Relayed};
pub use record::{Name, Record, Word};
