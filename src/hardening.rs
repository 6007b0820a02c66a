//! Process hardening policy, applied by `main` before any thread exists: the process becomes
//! non-dumpable (no core files, no same-user ptrace, `/proc/PID/mem` root-only) and
//! dynamic-loader variables are removed from the environment so no child or re-exec
//! inherits them. A write past the file-size limit (`ulimit -f`: a dump file, or stderr
//! sent to a file) fails instead of killing the process (`SIGXFSZ` ignored), so the
//! server-info file is still removed and in-flight requests are not cut.
//!
//! Never exits the process: it returns an error and `main` maps it to exit code 4.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use crate::sys;

/// A hardening step that failed.
#[derive(Debug, thiserror::Error)]
pub enum HardeningError {
    /// prctl(PR_SET_DUMPABLE, 0) failed.
    #[error("could not mark the process non-dumpable (prctl PR_SET_DUMPABLE): {0}")]
    NotDumpable(std::io::Error),
    /// ptrace(PT_DENY_ATTACH) failed.
    #[error("could not deny debugger attachment (ptrace PT_DENY_ATTACH): {0}")]
    DenyAttach(std::io::Error),
    /// setrlimit(RLIMIT_CORE, 0) failed.
    #[error("could not disable core files (setrlimit RLIMIT_CORE): {0}")]
    CoreLimit(std::io::Error),
    /// signal(SIGXFSZ, SIG_IGN) failed.
    #[error("could not ignore SIGXFSZ: {0}")]
    FileSizeSignal(std::io::Error),
}

/// Whether an environment variable name is one the dynamic loader acts on.
pub fn is_loader_variable(name: &[u8]) -> bool {
    if cfg!(target_os = "macos") {
        name.starts_with(b"DYLD_")
    } else {
        name.starts_with(b"LD_")
    }
}

/// Applies every hardening step. Must run before any thread is spawned.
pub fn harden_process() -> Result<(), HardeningError> {
    #[cfg(target_os = "linux")]
    sys::set_not_dumpable().map_err(HardeningError::NotDumpable)?;
    #[cfg(target_os = "macos")]
    sys::deny_attach().map_err(HardeningError::DenyAttach)?;
    sys::disable_core_files().map_err(HardeningError::CoreLimit)?;
    sys::ignore_file_size_signal().map_err(HardeningError::FileSizeSignal)?;
    for name in sys::env_names() {
        if is_loader_variable(&name) {
            sys::remove_env_var(OsStr::from_bytes(&name));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loader_variables_are_recognised() {
        if cfg!(target_os = "macos") {
            assert!(is_loader_variable(b"DYLD_INSERT_LIBRARIES"));
        } else {
            assert!(is_loader_variable(b"LD_PRELOAD"));
            assert!(is_loader_variable(b"LD_LIBRARY_PATH"));
            assert!(!is_loader_variable(b"OLD_PWD"));
            assert!(!is_loader_variable(b"ld_preload"));
        }
        assert!(!is_loader_variable(b"PATH"));
    }
}
