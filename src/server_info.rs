//! The `--server-info` file: one JSON line `{"port":…,"pid":…,"auth_token":…}`. It holds a
//! credential, so it is written atomically (a temp file created `O_EXCL|O_NOFOLLOW` with mode
//! 0600 in the same directory, then renamed over the path), never readable by others, and
//! removed on clean exit only if it is still the file this process wrote.
//!
//! Before writing, the path is refused (and left untouched) when it is a symlink, not a
//! regular file, owned by someone else, or looser than 0600, and when a directory on the way
//! to it (each one the path names, and each one it really goes through once links are
//! followed), or a link on the way, could be changed by another user: one that belongs to
//! someone other than this user or root, or a directory writable by others without the
//! sticky bit. Whoever could change one could put a file of their own in its place and send
//! the clients that read it to a port of theirs, token and conversation included.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::paths::{self, Changeable, WayError, parent_dir};
use crate::sys;

/// What goes in the file.
#[derive(Debug, serde::Serialize)]
pub struct ServerInfo<'a> {
    /// The bound port.
    pub port: u16,
    /// The proxy's process id.
    pub pid: u32,
    /// The per-launch proxy token.
    pub auth_token: &'a str,
}

/// Why the server-info file cannot be written safely.
#[derive(Debug, thiserror::Error)]
pub enum ServerInfoError {
    /// The path is a symbolic link.
    #[error(
        "refusing --server-info {0}: it is a symbolic link; point the flag at a regular file in a private directory"
    )]
    Symlink(PathBuf),
    /// The path exists and is not a regular file.
    #[error("refusing --server-info {0}: it exists and is not a regular file")]
    NotRegular(PathBuf),
    /// An existing file there has group/other permission bits.
    #[error(
        "refusing --server-info {path}: the existing file has mode {mode:04o}, looser than 0600; remove it or `chmod 600` it (the file holds the proxy token)"
    )]
    TooOpen {
        /// The path.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// An existing file there belongs to another user.
    #[error("refusing --server-info {0}: the existing file belongs to another user")]
    OtherOwner(PathBuf),
    /// The directory is writable by others and not sticky.
    #[error(
        "refusing --server-info in {0}: the directory is writable by other users without the sticky bit, so they could replace the file; use a private directory"
    )]
    OpenDirectory(PathBuf),
    /// A directory on the way its group may write, where the group is not this user's own.
    #[error(
        "refusing --server-info under {path}: its group (gid {gid}) may write it, so another member could replace the file; `chmod g-w` it or use a directory that only you (or root) can change"
    )]
    GroupDirectory {
        /// The directory.
        path: PathBuf,
        /// Its group.
        gid: u32,
    },
    /// A directory on the way with an access ACL that may let other users write it.
    #[error(
        "refusing --server-info under {0}: its access ACL may let other users write it, so they could replace the file; remove the ACL (`setfacl -b`) or use a directory that only you (or root) can change"
    )]
    AclDirectory(PathBuf),
    /// A directory or link on the way to the file belongs to another user (not root).
    #[error(
        "refusing --server-info under {path}: it belongs to another user (uid {uid}), who could replace the file and send the clients that read it elsewhere; use a directory that only you (or root) can change, e.g. one the proxy creates"
    )]
    OtherOwnerOnTheWay {
        /// The directory or link.
        path: PathBuf,
        /// Its owner.
        uid: u32,
    },
    /// Without `--server-info` the token goes to standard error, and that is a file others
    /// could read.
    #[error(
        "refusing to print the proxy token to standard error: it is the file {file} (mode {mode:04o}), which {who} can read, and whoever holds the token can spend the key through the proxy; give --server-info FILE, or send standard error to a file only you can read"
    )]
    OpenStderr {
        /// The file, as `/proc/self/fd/2` names it.
        file: String,
        /// Its permission bits.
        mode: u32,
        /// Who else can read it.
        who: crate::paths::Readers,
    },
    /// A filesystem operation failed.
    #[error("cannot write --server-info {path}: {op}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

/// The file attributes the safety decision looks at.
#[derive(Debug, Clone, Copy)]
pub struct FileFacts {
    /// `lstat` says symlink.
    pub is_symlink: bool,
    /// `lstat` says regular file.
    pub is_file: bool,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
}

/// Pure: may an existing file with these facts be replaced by the server-info file?
pub fn judge_existing(path: &Path, f: FileFacts, euid: u32) -> Result<(), ServerInfoError> {
    if f.is_symlink {
        return Err(ServerInfoError::Symlink(path.to_path_buf()));
    }
    if !f.is_file {
        return Err(ServerInfoError::NotRegular(path.to_path_buf()));
    }
    if f.uid != euid {
        return Err(ServerInfoError::OtherOwner(path.to_path_buf()));
    }
    if f.mode & 0o077 != 0 {
        return Err(ServerInfoError::TooOpen {
            path: path.to_path_buf(),
            mode: f.mode & 0o7777,
        });
    }
    Ok(())
}

/// Whether another user could change the way to `dir`, as a server-info refusal.
fn check_the_way(dir: &Path) -> Result<(), ServerInfoError> {
    paths::check_the_way(dir, paths::Me::now()).map_err(|e| match e {
        WayError::Changeable(Changeable::OpenToOthers(p)) => ServerInfoError::OpenDirectory(p),
        WayError::Changeable(Changeable::OpenToGroup { path, gid }) => {
            ServerInfoError::GroupDirectory { path, gid }
        }
        WayError::Changeable(Changeable::AclOpen(p)) => ServerInfoError::AclDirectory(p),
        WayError::Changeable(Changeable::OtherOwner { path, uid }) => {
            ServerInfoError::OtherOwnerOnTheWay { path, uid }
        }
        WayError::Io { op, path, source } => ServerInfoError::Io { path, op, source },
    })
}

fn io_err(path: &Path, op: &'static str) -> impl FnOnce(io::Error) -> ServerInfoError {
    let path = path.to_path_buf();
    move |source| ServerInfoError::Io { path, op, source }
}

/// Checks that `path` can be written safely, creating its directory (0700) if missing.
/// Leaves anything already at `path` untouched.
pub fn preflight(path: &Path) -> Result<(), ServerInfoError> {
    let dir = parent_dir(path);
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err(&dir, "creating the directory"))?;
    }
    check_the_way(&dir)?;
    match fs::symlink_metadata(path) {
        Ok(m) => judge_existing(
            path,
            FileFacts {
                is_symlink: m.file_type().is_symlink(),
                is_file: m.file_type().is_file(),
                mode: m.mode(),
                uid: m.uid(),
            },
            sys::effective_uid(),
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path, "inspecting the path")(e)),
    }
}

/// The file this process wrote, identified by device and inode.
#[derive(Debug)]
pub struct WrittenServerInfo {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

/// Writes `info` to `path` atomically with mode 0600 (after [`preflight`]).
pub fn write(path: &Path, info: &ServerInfo<'_>) -> Result<WrittenServerInfo, ServerInfoError> {
    preflight(path)?;
    let dir = parent_dir(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut line = serde_json::to_vec(info).map_err(|e| io_err(path, "encoding")(e.into()))?;
    line.push(b'\n');
    let mut last_err = None;
    for attempt in 0..8u32 {
        let mut nonce = [0u8; 8];
        if getrandom::getrandom(&mut nonce).is_err() {
            nonce = u64::from(attempt).to_le_bytes();
        }
        let tmp = dir.join(format!(
            ".{name}.{}.{:016x}.tmp",
            std::process::id(),
            u64::from_le_bytes(nonce)
        ));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp);
        let mut file = match file {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                last_err = Some(e);
                continue;
            }
            Err(e) => return Err(io_err(&tmp, "creating a temporary file")(e)),
        };
        let result = (|| {
            // The umask can only remove bits; make sure the mode is exactly 0600.
            file.set_permissions(fs::Permissions::from_mode(0o600))?;
            file.write_all(&line)?;
            file.sync_all()?;
            let meta = file.metadata()?;
            fs::rename(&tmp, path)?;
            Ok::<_, io::Error>((meta.dev(), meta.ino()))
        })();
        return match result {
            Ok((dev, ino)) => Ok(WrittenServerInfo {
                path: path.to_path_buf(),
                dev,
                ino,
            }),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(io_err(path, "writing")(e))
            }
        };
    }
    Err(io_err(&dir, "creating a temporary file")(
        last_err.unwrap_or_else(|| io::Error::from(io::ErrorKind::AlreadyExists)),
    ))
}

impl WrittenServerInfo {
    /// The path written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the file if it is still the one written. Returns whether it was removed.
    pub fn remove(&self) -> bool {
        match fs::symlink_metadata(&self.path) {
            Ok(m) if m.dev() == self.dev && m.ino() == self.ino => {
                fs::remove_file(&self.path).is_ok()
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(is_symlink: bool, is_file: bool, mode: u32, uid: u32) -> FileFacts {
        FileFacts {
            is_symlink,
            is_file,
            mode,
            uid,
        }
    }

    #[test]
    fn existing_file_table() {
        let p = Path::new("/x/info.json");
        assert!(judge_existing(p, facts(false, true, 0o100600, 1000), 1000).is_ok());
        assert!(judge_existing(p, facts(false, true, 0o100400, 1000), 1000).is_ok());
        assert!(matches!(
            judge_existing(p, facts(true, false, 0o120777, 1000), 1000),
            Err(ServerInfoError::Symlink(_))
        ));
        assert!(matches!(
            judge_existing(p, facts(false, false, 0o040700, 1000), 1000),
            Err(ServerInfoError::NotRegular(_))
        ));
        assert!(matches!(
            judge_existing(p, facts(false, true, 0o100600, 0), 1000),
            Err(ServerInfoError::OtherOwner(_))
        ));
        assert!(matches!(
            judge_existing(p, facts(false, true, 0o100644, 1000), 1000),
            Err(ServerInfoError::TooOpen { mode: 0o644, .. })
        ));
        assert!(matches!(
            judge_existing(p, facts(false, true, 0o100640, 1000), 1000),
            Err(ServerInfoError::TooOpen { .. })
        ));
        assert!(matches!(
            judge_existing(p, facts(false, true, 0o100444, 1000), 1000),
            Err(ServerInfoError::TooOpen { .. })
        ));
    }

    #[test]
    fn a_way_of_our_own_links_included_is_taken() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mine = dir.path().join("mine");
        fs::create_dir(&mine).expect("mkdir");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&mine, &link).expect("symlink");
        let info = ServerInfo {
            port: 1,
            pid: 2,
            auth_token: "t",
        };
        write(&link.join("info.json"), &info).expect("through our own link");
        assert!(mine.join("info.json").exists());
        // A relative path is checked from the working directory up.
        assert!(preflight(Path::new("info.json")).is_ok());
    }

    #[test]
    fn writes_atomically_with_mode_0600_and_removes_only_its_own_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/info.json");
        let info = ServerInfo {
            port: 1234,
            pid: 42,
            auth_token: "tok",
        };
        let written = write(&path, &info).expect("write");
        let meta = fs::metadata(&path).expect("meta");
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(
            fs::metadata(path.parent().expect("parent"))
                .expect("dir")
                .mode()
                & 0o777,
            0o700
        );
        assert_eq!(
            fs::read_to_string(&path).expect("read"),
            "{\"port\":1234,\"pid\":42,\"auth_token\":\"tok\"}\n"
        );
        let leftovers: Vec<_> = fs::read_dir(path.parent().expect("parent"))
            .expect("ls")
            .collect();
        assert_eq!(leftovers.len(), 1, "no temp file left behind");
        // Replaced by someone else: not ours any more, not removed. (The other file is
        // created while ours exists, so it cannot reuse our inode number.)
        let other = dir.path().join("other");
        fs::write(&other, "other").expect("write other");
        fs::rename(&other, &path).expect("replace");
        assert!(!written.remove());
        assert_eq!(fs::read_to_string(&path).expect("read"), "other");
        // Our own file is removed.
        fs::remove_file(&path).expect("rm");
        let written = write(&path, &info).expect("write again");
        assert!(written.remove());
        assert!(!path.exists());
    }
}
