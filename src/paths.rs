//! Who could change what a path leads to. The server-info file (clients trust it for where
//! the proxy is and its token) and the `--upstream-ca` file (its certificates decide who may
//! receive the key) are only taken from places that no user but this one and root can
//! change: whoever could would put a file of their own there.
//!
//! The decisions are pure ([`judge_directory`], [`judge_link`], [`judge_file`]);
//! [`check_the_way`] walks a directory's path and feeds them what `lstat`/`stat` say.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Something on a path that another user could change.
#[derive(Debug, thiserror::Error)]
pub enum Changeable {
    /// A directory, link or file belonging to another user (not root).
    #[error("{path} belongs to another user (uid {uid})")]
    OtherOwner {
        /// The directory, link or file.
        path: PathBuf,
        /// Its owner.
        uid: u32,
    },
    /// A directory others may write without the sticky bit (they could rename or remove
    /// what is in it), or a file others may write.
    #[error("{0} is writable by other users")]
    OpenToOthers(PathBuf),
}

/// Why a path's way could not be judged, or was refused.
#[derive(Debug, thiserror::Error)]
pub enum WayError {
    /// Another user could change something on the way.
    #[error(transparent)]
    Changeable(#[from] Changeable),
    /// Looking at the way failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

fn other_owner(path: &Path, uid: u32, euid: u32) -> Result<(), Changeable> {
    if uid != euid && uid != 0 {
        return Err(Changeable::OtherOwner {
            path: path.to_path_buf(),
            uid,
        });
    }
    Ok(())
}

/// Pure: only this user and root may own a directory on the way, and others may not write
/// it unless it is sticky (then they cannot rename or remove what is not theirs).
pub fn judge_directory(dir: &Path, mode: u32, uid: u32, euid: u32) -> Result<(), Changeable> {
    other_owner(dir, uid, euid)?;
    if mode & 0o002 != 0 && mode & 0o1000 == 0 {
        return Err(Changeable::OpenToOthers(dir.to_path_buf()));
    }
    Ok(())
}

/// Pure: a symbolic link on the way must be this user's or root's (its owner could remove
/// it and make another, in a sticky directory too).
pub fn judge_link(link: &Path, uid: u32, euid: u32) -> Result<(), Changeable> {
    other_owner(link, uid, euid)
}

/// Pure: a file read for trust must be this user's or root's, and not writable by others.
pub fn judge_file(file: &Path, mode: u32, uid: u32, euid: u32) -> Result<(), Changeable> {
    other_owner(file, uid, euid)?;
    if mode & 0o002 != 0 {
        return Err(Changeable::OpenToOthers(file.to_path_buf()));
    }
    Ok(())
}

/// Checks every directory on the way to `dir` (`dir` included): as the path names them
/// (made absolute from the working directory), any link among those, and the directories
/// the path really goes through once links are followed.
pub fn check_the_way(dir: &Path, euid: u32) -> Result<(), WayError> {
    let io_err = |op, path: &Path| {
        let path = path.to_path_buf();
        move |source| WayError::Io { op, path, source }
    };
    let named = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(io_err("reading the working directory for", dir))?
            .join(dir)
    };
    let real = fs::canonicalize(dir).map_err(io_err("resolving", dir))?;
    for way in [&named, &real] {
        for step in way.ancestors() {
            let here = fs::symlink_metadata(step).map_err(io_err("inspecting", step))?;
            if here.file_type().is_symlink() {
                judge_link(step, here.uid(), euid)?;
            }
            let m = fs::metadata(step).map_err(io_err("inspecting", step))?;
            judge_directory(step, m.mode(), m.uid(), euid)?;
        }
    }
    Ok(())
}

/// The directory holding `path` (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn who_may_own_and_write_what() {
        let d = Path::new("/x");
        for owner in [1000, 0] {
            assert!(judge_directory(d, 0o040700, owner, 1000).is_ok());
            assert!(judge_directory(d, 0o040755, owner, 1000).is_ok());
            assert!(judge_directory(d, 0o041777, owner, 1000).is_ok());
            assert!(matches!(
                judge_directory(d, 0o040777, owner, 1000),
                Err(Changeable::OpenToOthers(_))
            ));
            assert!(judge_directory(d, 0o040703, owner, 1000).is_err());
            assert!(judge_link(d, owner, 1000).is_ok());
            assert!(judge_file(d, 0o100644, owner, 1000).is_ok());
            assert!(judge_file(d, 0o100600, owner, 1000).is_ok());
            assert!(matches!(
                judge_file(d, 0o100646, owner, 1000),
                Err(Changeable::OpenToOthers(_))
            ));
        }
        // Another user's, however closed or sticky; also when the proxy runs as root.
        for (mode, euid) in [(0o040700, 1000), (0o041777, 1000), (0o040755, 0)] {
            assert!(matches!(
                judge_directory(d, mode, 1001, euid),
                Err(Changeable::OtherOwner { uid: 1001, .. })
            ));
        }
        assert!(matches!(
            judge_link(d, 1001, 1000),
            Err(Changeable::OtherOwner { uid: 1001, .. })
        ));
        assert!(matches!(
            judge_file(d, 0o100600, 1001, 0),
            Err(Changeable::OtherOwner { uid: 1001, .. })
        ));
    }

    #[test]
    fn a_way_of_our_own_is_taken_links_included() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mine = dir.path().join("mine");
        fs::create_dir(&mine).expect("mkdir");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&mine, &link).expect("symlink");
        let euid = crate::sys::effective_uid();
        check_the_way(&link, euid).expect("through our own link");
        check_the_way(Path::new("."), euid).expect("the working directory");
        assert!(matches!(
            check_the_way(&dir.path().join("missing"), euid),
            Err(WayError::Io { .. })
        ));
        // A private directory under one everyone may write: refused, naming that one.
        use std::os::unix::fs::PermissionsExt;
        let open = dir.path().join("open");
        let inner = open.join("inner");
        fs::create_dir_all(&inner).expect("mkdir");
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).expect("chmod");
        match check_the_way(&inner, euid) {
            Err(WayError::Changeable(Changeable::OpenToOthers(p))) => assert_eq!(p, open),
            other => panic!("{other:?}"),
        }
        // With the sticky bit, others cannot move what is not theirs: taken.
        fs::set_permissions(&open, fs::Permissions::from_mode(0o1777)).expect("chmod");
        check_the_way(&inner, euid).expect("sticky");
        assert_eq!(parent_dir(Path::new("info.json")), Path::new("."));
        assert_eq!(parent_dir(Path::new("/a/b")), Path::new("/a"));
    }
}
