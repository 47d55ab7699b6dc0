//! Loading the embedded eBPF object and attaching its programs to a cgroup.
pub mod cgroup;

use std::{fs::File, path::Path};

use aya::{
    Ebpf, EbpfError,
    programs::{CgroupAttachMode, CgroupSockAddr, ProgramError},
};

use crate::maps::KernelMaps;

/// The cgroup sock_addr programs, by their function names in egress-ebpf.
pub const PROGRAMS: [&str; 4] = ["connect4", "connect6", "sendmsg4", "sendmsg6"];

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object")]
    Load(#[source] EbpfError),
    #[error("the eBPF object has no program `{0}`")]
    MissingProgram(&'static str),
    #[error("loading program `{name}` into the kernel")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("opening cgroup {path}")]
    OpenCgroup {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("attaching `{name}` to cgroup {path}")]
    Attach {
        name: &'static str,
        path: String,
        #[source]
        source: ProgramError,
    },
    #[error(transparent)]
    Maps(#[from] crate::maps::MapsError),
}

/// The loaded programs. Dropping it detaches every program it attached.
pub struct Datapath {
    ebpf: Ebpf,
}

impl Datapath {
    /// Loads and verifies every program; attaches nothing yet.
    pub fn load() -> Result<(Self, KernelMaps), DatapathError> {
        let mut ebpf = Ebpf::load(aya::include_bytes_aligned!(concat!(
            env!("OUT_DIR"),
            "/egress"
        )))
        .map_err(DatapathError::Load)?;
        for name in PROGRAMS {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingProgram(name))?
                .try_into()
                .map_err(|source| DatapathError::Program { name, source })?;
            prog.load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        let maps = KernelMaps::take(&mut ebpf)?;
        Ok((Self { ebpf }, maps))
    }

    /// Attaches every program to the cgroup as a bpf_link. The kernel attaches links in multi mode
    /// (and rejects an explicit BPF_F_ALLOW_MULTI, hence `Single`): they run for the cgroup's
    /// descendants too, which cannot override them, beside other tools' programs.
    pub fn attach(&mut self, cgroup: &Path) -> Result<(), DatapathError> {
        let path = cgroup.display().to_string();
        let file = File::open(cgroup).map_err(|source| DatapathError::OpenCgroup {
            path: path.clone(),
            source,
        })?;
        for name in PROGRAMS {
            let prog: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingProgram(name))?
                .try_into()
                .map_err(|source| DatapathError::Program { name, source })?;
            prog.attach(&file, CgroupAttachMode::Single)
                .map_err(|source| DatapathError::Attach {
                    name,
                    path: path.clone(),
                    source,
                })?;
        }
        Ok(())
    }
}
