//! Who could change what a path leads to. The server-info file (clients trust it for where
//! the proxy is and its token) and the `--upstream-ca` file (its certificates decide who may
//! receive the key) are only taken from places that no user but this one and root can
//! change: whoever could would put a file of their own there.
//!
//! The decisions are pure ([`judge_directory`], [`judge_link`], [`judge_file`]);
//! [`check_the_way`] walks a directory's path and feeds them what `lstat`/`stat` say.
//!
//! A group may write only where it is this user's own: a user-private group (its id is the
//! user's id and the process's group, the convention under which Debian and Ubuntu give
//! each user a group and a umask of 002). Any other group may have other members, and the
//! group database cannot say for sure that it has none (members may come from LDAP).

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
    /// A directory its group may write without the sticky bit, or a file its group may
    /// write, where the group is not this user's own (see the module's text).
    #[error("{path} is writable by its group (gid {gid}), which other users may belong to")]
    OpenToGroup {
        /// The directory or file.
        path: PathBuf,
        /// Its group.
        gid: u32,
    },
    /// A directory (not sticky) or file with an access ACL whose mask allows writing: the
    /// ACL may name other users or groups who may write it.
    #[error("{0} has an access ACL that may let other users write it")]
    AclOpen(PathBuf),
}

/// What `stat` and the file's ACL say of a directory or file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts {
    /// Type and permission bits (with an ACL, the group bits are its mask).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// It has an access ACL beyond its mode bits.
    pub extended_acl: bool,
}

impl Facts {
    /// The facts of `m`, with whether an extended ACL was found.
    pub fn of(m: &fs::Metadata, extended_acl: bool) -> Self {
        Self {
            mode: m.mode(),
            uid: m.uid(),
            gid: m.gid(),
            extended_acl,
        }
    }
}

/// The process's effective user and group: who the proxy acts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Me {
    /// Effective user id.
    pub uid: u32,
    /// Effective group id.
    pub gid: u32,
}

impl Me {
    /// This process's effective ids.
    pub fn now() -> Self {
        Self {
            uid: crate::sys::effective_uid(),
            gid: crate::sys::effective_gid(),
        }
    }

    /// Whether `gid` is this user's private group (no one else's to write with).
    fn owns_group(self, gid: u32) -> bool {
        gid == self.gid && gid == self.uid
    }
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

fn other_owner(path: &Path, uid: u32, me: Me) -> Result<(), Changeable> {
    if uid != me.uid && uid != 0 {
        return Err(Changeable::OtherOwner {
            path: path.to_path_buf(),
            uid,
        });
    }
    Ok(())
}

/// Pure: who besides its owner may write a directory or file with these facts.
/// `sticky_helps`: a directory's sticky bit keeps writers from renaming or removing what is
/// not theirs.
fn writers(path: &Path, f: Facts, me: Me, sticky_helps: bool) -> Result<(), Changeable> {
    if sticky_helps && f.mode & 0o1000 != 0 {
        return Ok(());
    }
    if f.mode & 0o002 != 0 {
        return Err(Changeable::OpenToOthers(path.to_path_buf()));
    }
    if f.mode & 0o020 != 0 {
        if f.extended_acl {
            return Err(Changeable::AclOpen(path.to_path_buf()));
        }
        if !me.owns_group(f.gid) {
            return Err(Changeable::OpenToGroup {
                path: path.to_path_buf(),
                gid: f.gid,
            });
        }
    }
    Ok(())
}

/// Pure: only this user and root may own a directory on the way, and neither others nor a
/// group not this user's own (nor users an ACL names) may write it unless it is sticky
/// (then they cannot rename or remove what is not theirs).
pub fn judge_directory(dir: &Path, f: Facts, me: Me) -> Result<(), Changeable> {
    other_owner(dir, f.uid, me)?;
    writers(dir, f, me, true)
}

/// Pure: a symbolic link on the way must be this user's or root's (its owner could remove
/// it and make another, in a sticky directory too).
pub fn judge_link(link: &Path, uid: u32, me: Me) -> Result<(), Changeable> {
    other_owner(link, uid, me)
}

/// Pure: a file read for trust must be this user's or root's, and writable neither by
/// others nor by a group not this user's own (nor by users an ACL names).
pub fn judge_file(file: &Path, f: Facts, me: Me) -> Result<(), Changeable> {
    other_owner(file, f.uid, me)?;
    writers(file, f, me, false)
}

/// Who besides this user and root could read a file holding a secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readers {
    /// It belongs to another user, who can read it (or make it readable).
    Owner(u32),
    /// Its mode lets every user read it.
    Others,
    /// Its group may read it, and the group is not this user's own private group.
    Group(u32),
    /// An access ACL whose mask allows reading may name other users.
    Acl,
}

impl std::fmt::Display for Readers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Owner(uid) => write!(f, "its owner, another user (uid {uid})"),
            Self::Others => f.write_str("every user"),
            Self::Group(gid) => write!(f, "its group (gid {gid})"),
            Self::Acl => f.write_str("users its access ACL names"),
        }
    }
}

/// Pure: who else could read a regular file with these facts (the first reason found).
pub fn other_readers(f: Facts, me: Me) -> Option<Readers> {
    if f.uid != me.uid && f.uid != 0 {
        return Some(Readers::Owner(f.uid));
    }
    if f.mode & 0o004 != 0 {
        return Some(Readers::Others);
    }
    if f.mode & 0o040 != 0 {
        if f.extended_acl {
            return Some(Readers::Acl);
        }
        if !me.owns_group(f.gid) {
            return Some(Readers::Group(f.gid));
        }
    }
    None
}

/// When descriptor `fd` of this process (named `/proc/self/fd/N` by `proc_name`) is a
/// regular file that others could read: its path as `/proc` names it (or `proc_name`), its
/// mode, and who. `None` for a pipe, a terminal, a socket, or a private file. Standard input
/// holding the key (`proxy < key-file`) and standard error about to receive the token are
/// looked at this way.
pub fn open_file_readers(
    fd: std::os::fd::BorrowedFd<'_>,
    proc_name: &str,
) -> Option<(String, u32, Readers)> {
    use std::os::fd::AsFd;
    let file = std::fs::File::from(fd.try_clone_to_owned().ok()?);
    let m = file.metadata().ok()?;
    if !m.is_file() {
        return None;
    }
    let acl = crate::sys::fd_has_extended_acl(file.as_fd()).unwrap_or(false);
    let who = other_readers(Facts::of(&m, acl), Me::now())?;
    let path = fs::read_link(proc_name)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| proc_name.to_owned());
    Some((path, m.mode() & 0o7777, who))
}

/// Checks every directory on the way to `dir` (`dir` included): as the path names them
/// (made absolute from the working directory), any link among those, and the directories
/// the path really goes through once links are followed.
pub fn check_the_way(dir: &Path, me: Me) -> Result<(), WayError> {
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
                judge_link(step, here.uid(), me)?;
            }
            let m = fs::metadata(step).map_err(io_err("inspecting", step))?;
            let acl = crate::sys::has_extended_acl(step)
                .map_err(io_err("reading the access ACL of", step))?;
            judge_directory(step, Facts::of(&m, acl), me)?;
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

    const ME: Me = Me {
        uid: 1000,
        gid: 1000,
    };

    /// Facts without an ACL.
    fn f(mode: u32, uid: u32, gid: u32) -> Facts {
        Facts {
            mode,
            uid,
            gid,
            extended_acl: false,
        }
    }

    #[test]
    fn who_may_own_and_write_what() {
        let d = Path::new("/x");
        for owner in [1000, 0] {
            assert!(judge_directory(d, f(0o040700, owner, 1000), ME).is_ok());
            assert!(judge_directory(d, f(0o040755, owner, 1000), ME).is_ok());
            assert!(judge_directory(d, f(0o041777, owner, 1000), ME).is_ok());
            assert!(matches!(
                judge_directory(d, f(0o040777, owner, 1000), ME),
                Err(Changeable::OpenToOthers(_))
            ));
            assert!(judge_directory(d, f(0o040703, owner, 1000), ME).is_err());
            assert!(judge_link(d, owner, ME).is_ok());
            assert!(judge_file(d, f(0o100644, owner, 1000), ME).is_ok());
            assert!(judge_file(d, f(0o100600, owner, 1000), ME).is_ok());
            assert!(matches!(
                judge_file(d, f(0o100646, owner, 1000), ME),
                Err(Changeable::OpenToOthers(_))
            ));
        }
        // Another user's, however closed or sticky; also when the proxy runs as root.
        let root = Me { uid: 0, gid: 0 };
        for (mode, me) in [(0o040700, ME), (0o041777, ME), (0o040755, root)] {
            assert!(matches!(
                judge_directory(d, f(mode, 1001, 1001), me),
                Err(Changeable::OtherOwner { uid: 1001, .. })
            ));
        }
        assert!(matches!(
            judge_link(d, 1001, ME),
            Err(Changeable::OtherOwner { uid: 1001, .. })
        ));
        assert!(matches!(
            judge_file(d, f(0o100600, 1001, 1001), root),
            Err(Changeable::OtherOwner { uid: 1001, .. })
        ));
    }

    #[test]
    fn a_group_may_write_only_where_it_is_this_users_own() {
        let d = Path::new("/x");
        // The user's private group (its id is the user's and the process's group): taken,
        // for root too.
        for me in [ME, Me { uid: 0, gid: 0 }] {
            assert!(judge_directory(d, f(0o040775, me.uid, me.gid), me).is_ok());
            assert!(judge_file(d, f(0o100664, me.uid, me.gid), me).is_ok());
        }
        // Any other group: refused, naming it, from a directory of ours or root's.
        for owner in [1000, 0] {
            for gid in [100, 0, 1001] {
                assert!(matches!(
                    judge_directory(d, f(0o040770, owner, gid), ME),
                    Err(Changeable::OpenToGroup { gid: g, .. }) if g == gid
                ));
                assert!(matches!(
                    judge_file(d, f(0o100660, owner, gid), ME),
                    Err(Changeable::OpenToGroup { gid: g, .. }) if g == gid
                ));
                // Read by the group only: taken.
                assert!(judge_directory(d, f(0o040750, owner, gid), ME).is_ok());
                assert!(judge_file(d, f(0o100640, owner, gid), ME).is_ok());
            }
        }
        // The process's group that is not a private one (e.g. a shared `users` group).
        let shared = Me {
            uid: 1000,
            gid: 100,
        };
        assert!(judge_directory(d, f(0o040775, 1000, 100), shared).is_err());
        // A user whose id matches a group it does not act as.
        assert!(judge_directory(d, f(0o040775, 1000, 1000), shared).is_err());
        // Sticky: its group cannot move what is not theirs; a file has no such protection.
        assert!(judge_directory(d, f(0o041770, 1000, 100), ME).is_ok());
        assert!(judge_file(d, f(0o101660, 1000, 100), ME).is_err());
    }

    #[test]
    fn an_acl_whose_mask_allows_writing_is_refused_even_in_our_own_group() {
        let d = Path::new("/x");
        let acl = |mode| Facts {
            extended_acl: true,
            ..f(mode, 1000, 1000)
        };
        // The mask (the group bits) allows writing: the ACL may name anyone.
        assert!(matches!(
            judge_directory(d, acl(0o040775), ME),
            Err(Changeable::AclOpen(_))
        ));
        assert!(matches!(
            judge_file(d, acl(0o100664), ME),
            Err(Changeable::AclOpen(_))
        ));
        // It does not: no one the ACL names may write. Sticky: they cannot move our files.
        assert!(judge_directory(d, acl(0o040755), ME).is_ok());
        assert!(judge_file(d, acl(0o100644), ME).is_ok());
        assert!(judge_directory(d, acl(0o041775), ME).is_ok());
    }

    #[test]
    fn who_else_could_read_a_secret_file() {
        for me in [ME, Me { uid: 0, gid: 0 }] {
            assert_eq!(other_readers(f(0o100600, me.uid, me.gid), me), None);
            assert_eq!(other_readers(f(0o100400, 0, 0), me), None);
            // Its own private group: no one else.
            assert_eq!(other_readers(f(0o100640, me.uid, me.gid), me), None);
            assert_eq!(
                other_readers(f(0o100644, me.uid, me.gid), me),
                Some(Readers::Others)
            );
            assert_eq!(
                other_readers(f(0o100640, me.uid, 4242), me),
                Some(Readers::Group(4242))
            );
            assert_eq!(
                other_readers(f(0o100600, 1001, 1001), me),
                Some(Readers::Owner(1001))
            );
            let acl = |mode| Facts {
                extended_acl: true,
                ..f(mode, me.uid, me.gid)
            };
            assert_eq!(other_readers(acl(0o100640), me), Some(Readers::Acl));
            // A mask without read: no one the ACL names may read.
            assert_eq!(other_readers(acl(0o100600), me), None);
        }
        // Writable only, by the group: not a reader.
        assert_eq!(other_readers(f(0o100620, 1000, 100), ME), None);
    }

    #[test]
    fn a_way_of_our_own_is_taken_links_included() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mine = dir.path().join("mine");
        fs::create_dir(&mine).expect("mkdir");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&mine, &link).expect("symlink");
        let me = Me::now();
        check_the_way(&link, me).expect("through our own link");
        check_the_way(Path::new("."), me).expect("the working directory");
        assert!(matches!(
            check_the_way(&dir.path().join("missing"), me),
            Err(WayError::Io { .. })
        ));
        // A private directory under one everyone may write: refused, naming that one.
        use std::os::unix::fs::PermissionsExt;
        let open = dir.path().join("open");
        let inner = open.join("inner");
        fs::create_dir_all(&inner).expect("mkdir");
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).expect("chmod");
        match check_the_way(&inner, me) {
            Err(WayError::Changeable(Changeable::OpenToOthers(p))) => assert_eq!(p, open),
            other => panic!("{other:?}"),
        }
        // With the sticky bit, others cannot move what is not theirs: taken.
        fs::set_permissions(&open, fs::Permissions::from_mode(0o1777)).expect("chmod");
        check_the_way(&inner, me).expect("sticky");
        assert_eq!(parent_dir(Path::new("info.json")), Path::new("."));
        assert_eq!(parent_dir(Path::new("/a/b")), Path::new("/a"));
    }
}
