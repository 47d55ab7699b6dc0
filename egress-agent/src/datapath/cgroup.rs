//! cgroup v2 paths: finding the mount, creating and removing enforced cgroups.
use std::{
    fs, io,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("reading /proc/self/mountinfo")]
    MountInfo(#[source] io::Error),
    #[error("no cgroup2 filesystem is mounted (see /proc/self/mountinfo)")]
    NoCgroup2,
    #[error("creating cgroup {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a directory under the cgroup2 mount {mount}")]
    Outside { path: PathBuf, mount: PathBuf },
    #[error("emptying cgroup {path}")]
    Kill {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cgroup {path} still has processes after {waited:?}")]
    StillPopulated { path: PathBuf, waited: Duration },
    #[error("removing cgroup {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The cgroup2 mount point, from /proc/self/mountinfo (it moves between hybrid and unified hosts).
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let info = fs::read_to_string("/proc/self/mountinfo").map_err(CgroupError::MountInfo)?;
    mount_from_mountinfo(&info).ok_or(CgroupError::NoCgroup2)
}

fn mount_from_mountinfo(info: &str) -> Option<PathBuf> {
    info.lines().find_map(|line| {
        // Fields: id parent dev root mountpoint opts [optional...] - fstype source superopts
        let (left, right) = line.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })
}

/// Resolves a `--cgroup` argument: `/` is the whole host, an absolute path under the mount is
/// itself, anything else is relative to the mount. Created if absent.
pub fn resolve(arg: &Path) -> Result<PathBuf, CgroupError> {
    let mount = cgroup2_mount()?;
    let path = if arg == Path::new("/") {
        mount.clone()
    } else if arg.starts_with(&mount) {
        arg.to_owned()
    } else {
        mount.join(arg.strip_prefix("/").unwrap_or(arg))
    };
    if !path.starts_with(&mount) || path.components().any(|c| c.as_os_str() == "..") {
        return Err(CgroupError::Outside { path, mount });
    }
    fs::create_dir_all(&path).map_err(|source| CgroupError::Create {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// Whether a process is in the cgroup at `path` or below it (`cgroup.events`).
pub fn populated(path: &Path) -> std::io::Result<bool> {
    fs::read_to_string(path.join("cgroup.events")).map(|s| s.lines().any(|l| l == "populated 1"))
}

/// Kills every process left in a cgroup and removes it. Used when enforcement of that cgroup
/// ends: a process left behind would run unenforced.
pub fn kill_and_remove(path: &Path) -> Result<(), CgroupError> {
    let populated = || populated(path).unwrap_or(false);
    if populated() {
        fs::write(path.join("cgroup.kill"), "1").map_err(|source| CgroupError::Kill {
            path: path.to_owned(),
            source,
        })?;
        let waited = Duration::from_secs(5);
        let deadline = Instant::now() + waited;
        while populated() {
            if Instant::now() > deadline {
                return Err(CgroupError::StillPopulated {
                    path: path.to_owned(),
                    waited,
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    // Child cgroups a command made must go first.
    if let Ok(entries) = fs::read_dir(path) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                kill_and_remove(&e.path())?;
            }
        }
    }
    fs::remove_dir(path).map_err(|source| CgroupError::Remove {
        path: path.to_owned(),
        source,
    })
}

/// What the TC programs need to tell an enforced socket: the cgroup's id (its inode number on
/// cgroup2) and its depth below the mount.
pub fn identity(mount: &Path, path: &Path) -> Result<(u64, u32), CgroupError> {
    use std::os::unix::fs::MetadataExt as _;
    let rel = path.strip_prefix(mount).map_err(|_| CgroupError::Outside {
        path: path.to_owned(),
        mount: mount.to_owned(),
    })?;
    let meta = fs::metadata(path).map_err(|source| CgroupError::Create {
        path: path.to_owned(),
        source,
    })?;
    Ok((meta.ino(), rel.components().count() as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_mountinfo() {
        let info = "30 24 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            mount_from_mountinfo(info),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            mount_from_mountinfo("30 24 0:26 / /x rw - tmpfs t rw\n"),
            None
        );
    }
}
