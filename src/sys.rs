//! The only module allowed to use `unsafe`: thin, checked wrappers over the system calls the
//! proxy needs (read(2), poll(2), shutdown(2), mmap/mlock/madvise, prctl,
//! getrlimit/setrlimit, a signal's disposition, termios, the environment, files created,
//! renamed and removed inside a directory held open).
//!
//! Each function has a safe signature, turns `-1` into `io::Error`, and carries a `SAFETY:`
//! argument on every block. Policy (what to call, when, and what a failure means) lives in
//! `hardening.rs` and `secret.rs`; nothing here decides anything.
#![allow(unsafe_code)]

use std::ffi::{CStr, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;

/// Turns a C-style `-1` return into the thread's `errno` as an `io::Error`.
fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// One `read(2)` on `fd` into `buf`. Returns the count read (0 at end of file). EINTR is
/// returned as `ErrorKind::Interrupted` for the caller to retry.
pub fn read_fd(fd: libc::c_int, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid, writable slice of `buf.len()` bytes for the whole call, and
    // read(2) writes at most that many bytes into it.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        // `n` is non-negative and at most `buf.len()`, so it fits a usize.
        Ok(n as usize)
    }
}

/// Shuts down the sending side of a socket: the peer reads the end of the stream, and
/// reading from it goes on.
pub fn shutdown_write(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: shutdown(2) takes no pointers; `fd` is borrowed, so the descriptor stays open
    // for the duration of the call.
    check(unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) }).map(drop)
}

/// Waits until `fd` can be read without blocking (data, its end, or an error), at most
/// `limit`. `Ok(false)`: the time ran out. A signal ending the wait early counts as ready;
/// the caller's read then says what there is.
pub fn wait_readable(
    fd: std::os::fd::BorrowedFd<'_>,
    limit: std::time::Duration,
) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // Rounded up, so a wait of less than a millisecond is not a wait of none.
    let ms =
        libc::c_int::try_from(limit.as_nanos().div_ceil(1_000_000)).unwrap_or(libc::c_int::MAX);
    // SAFETY: `pfd` is one valid, writable pollfd for the whole call and the count passed
    // is 1; `fd` is borrowed, so the descriptor stays open for the duration of the call.
    match check(unsafe { libc::poll(&mut pfd, 1, ms) }) {
        Ok(n) => Ok(n > 0),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(true),
        Err(e) => Err(e),
    }
}

/// The system's page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n <= 0 { 4096 } else { n as usize }
}

/// Maps `len` bytes (rounded up to whole pages) of private anonymous, zero-filled memory that
/// is never unmapped: the region lives as long as the process. Used for the API key only.
pub fn map_private_pages(len: usize) -> io::Result<&'static mut [u8]> {
    let page = page_size();
    let len = len.div_ceil(page).max(1) * page;
    // SAFETY: an anonymous private mapping with a null hint has no preconditions; the result
    // is checked against MAP_FAILED before use.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a fresh, zero-filled, readable and writable mapping of `len`
    // bytes that nothing else references; it is never unmapped, so `'static` holds, and the
    // only reference to it is the one returned here.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr.cast::<u8>(), len) })
}

/// Locks the pages holding `region` into RAM so they are never written to swap.
pub fn mlock(region: &[u8]) -> io::Result<()> {
    // SAFETY: mlock only reads the address range of a live slice; it does not access it.
    check(unsafe { libc::mlock(region.as_ptr().cast(), region.len()) }).map(drop)
}

/// Excludes the pages holding `region` (which must be page-aligned) from core dumps.
#[cfg(target_os = "linux")]
pub fn madvise_dontdump(region: &mut [u8]) -> io::Result<()> {
    // SAFETY: `region` is a live, page-aligned mapping we own; MADV_DONTDUMP changes only
    // how the kernel dumps it, not its contents or validity.
    check(unsafe {
        libc::madvise(
            region.as_mut_ptr().cast(),
            region.len(),
            libc::MADV_DONTDUMP,
        )
    })
    .map(drop)
}

/// Excluding pages from core dumps is Linux-only; elsewhere core dumps are disabled instead.
#[cfg(not(target_os = "linux"))]
pub fn madvise_dontdump(_region: &mut [u8]) -> io::Result<()> {
    Ok(())
}

/// Marks the process not dumpable: no core files, no ptrace attach by the same user, and
/// `/proc/PID/mem` and `/proc/PID/environ` readable only by root.
#[cfg(target_os = "linux")]
pub fn set_not_dumpable() -> io::Result<()> {
    // SAFETY: PR_SET_DUMPABLE takes an integer argument and touches no memory of ours.
    check(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0 as libc::c_ulong, 0, 0, 0) }).map(drop)
}

/// Denies debugger attachment (macOS).
#[cfg(target_os = "macos")]
pub fn deny_attach() -> io::Result<()> {
    // SAFETY: PT_DENY_ATTACH takes no address or data argument.
    check(unsafe { libc::ptrace(libc::PT_DENY_ATTACH, 0, std::ptr::null_mut(), 0) }).map(drop)
}

/// Sets both the soft and the hard core-file size limit to zero.
pub fn disable_core_files() -> io::Result<()> {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `zero` is a valid rlimit that outlives the call.
    check(unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) }).map(drop)
}

/// Makes a write past the file-size limit (`ulimit -f`) fail with `EFBIG` instead of
/// killing the process with `SIGXFSZ`.
pub fn ignore_file_size_signal() -> io::Result<()> {
    // SAFETY: SIG_IGN installs no handler code, so nothing runs in signal context; changing
    // a disposition has no memory-safety preconditions.
    if unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) } == libc::SIG_ERR {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `name` as one path component for the `*at` calls: not empty, not `.` or `..`, no `/`,
/// no NUL.
fn component(name: &str) -> io::Result<std::ffi::CString> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a single file name",
        ));
    }
    std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a file name"))
}

/// Creates the new file `name` inside the open directory `dir` for writing
/// (`openat(2)` with `O_CREAT|O_EXCL|O_NOFOLLOW|O_CLOEXEC`, `mode`): it never opens an
/// existing file or follows a link, and where it lands does not depend on the directory's
/// path any more.
pub fn create_in(
    dir: std::os::fd::BorrowedFd<'_>,
    name: &str,
    mode: u32,
) -> io::Result<std::fs::File> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let name = component(name)?;
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: `name` is a NUL-terminated string that lives for the whole call; `dir` is
    // borrowed, so the descriptor stays open for the call; the mode is passed as the
    // variadic argument O_CREAT requires, widened to an unsigned int.
    let fd = check(unsafe {
        libc::openat(dir.as_raw_fd(), name.as_ptr(), flags, mode as libc::c_uint)
    })?;
    // SAFETY: openat just returned `fd`, a new descriptor that nothing else owns; the File
    // takes sole ownership and closes it once.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// Removes the file `name` from the open directory `dir` (`unlinkat(2)`).
pub fn remove_in(dir: std::os::fd::BorrowedFd<'_>, name: &str) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let name = component(name)?;
    // SAFETY: `name` is a NUL-terminated string that lives for the whole call; `dir` is
    // borrowed, so the descriptor stays open for the call.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) }).map(drop)
}

/// Gives the file `from` in the open directory `dir` the name `to` there, never replacing
/// a file already called `to` (`AlreadyExists`): `renameat2(2)` with `RENAME_NOREPLACE`,
/// or, on a file system without it, a hard link under the new name and the old one removed.
/// Either way a reader of the directory sees `to` only once it is complete.
pub fn publish_in(dir: std::os::fd::BorrowedFd<'_>, from: &str, to: &str) -> io::Result<()> {
    match rename_noreplace_in(dir, from, to) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) => {
            link_then_unlink_in(dir, from, to)
        }
        done => done,
    }
}

fn rename_noreplace_in(dir: std::os::fd::BorrowedFd<'_>, from: &str, to: &str) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (from, to) = (component(from)?, component(to)?);
    let fd = dir.as_raw_fd();
    // SAFETY: both names are NUL-terminated strings that live for the whole call; `dir` is
    // borrowed, so the descriptor stays open for the call.
    check(unsafe { libc::renameat2(fd, from.as_ptr(), fd, to.as_ptr(), libc::RENAME_NOREPLACE) })
        .map(drop)
}

fn link_then_unlink_in(dir: std::os::fd::BorrowedFd<'_>, from: &str, to: &str) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (from_c, to_c) = (component(from)?, component(to)?);
    let fd = dir.as_raw_fd();
    // SAFETY: both names are NUL-terminated strings that live for the whole call; `dir` is
    // borrowed, so the descriptor stays open for the call. Flags 0: a link at `from` would
    // itself be linked, not followed.
    check(unsafe { libc::linkat(fd, from_c.as_ptr(), fd, to_c.as_ptr(), 0) })?;
    remove_in(dir, from)
}

/// The soft and hard limits on this process's open file descriptors (`RLIMIT_NOFILE`).
pub fn open_files_limit() -> io::Result<(u64, u64)> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid, writable rlimit that outlives the call.
    check(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) })?;
    Ok((r.rlim_cur, r.rlim_max))
}

/// Sets the soft limit on open file descriptors to `soft`, the hard one left at `hard`
/// (which must be the current hard limit: an unprivileged process can only lower it).
pub fn set_open_files_limit(soft: u64, hard: u64) -> io::Result<()> {
    let r = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: `r` is a valid rlimit that outlives the call.
    check(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) }).map(drop)
}

/// Whether `fd` refers to a terminal.
pub fn is_terminal(fd: libc::c_int) -> bool {
    // SAFETY: isatty has no memory-safety preconditions.
    unsafe { libc::isatty(fd) == 1 }
}

/// Terminal echo turned off on `fd` until this guard is dropped.
pub struct EchoOff {
    fd: libc::c_int,
    saved: libc::termios,
}

impl EchoOff {
    /// Turns echo off on the terminal `fd`, remembering the previous settings.
    pub fn new(fd: libc::c_int) -> io::Result<Self> {
        // SAFETY: termios is plain data; an all-zero value is valid and is overwritten below.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid, writable termios for the call.
        check(unsafe { libc::tcgetattr(fd, &mut saved) })?;
        let mut quiet = saved;
        quiet.c_lflag &= !(libc::ECHO | libc::ECHONL);
        // SAFETY: `quiet` is a valid termios that outlives the call.
        check(unsafe { libc::tcsetattr(fd, libc::TCSAFLUSH, &quiet) })?;
        Ok(Self { fd, saved })
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        // SAFETY: `self.saved` is the valid termios read in `new`. A failure leaves the
        // terminal without echo, which the user can fix with `stty echo`; nothing to do here.
        unsafe {
            libc::tcsetattr(self.fd, libc::TCSAFLUSH, &self.saved);
        }
    }
}

/// Points fd 0 at `/dev/null`, so nothing can later read what followed the key on stdin and
/// the pipe the key came through is closed.
pub fn replace_stdin_with_dev_null() -> io::Result<()> {
    let path = c"/dev/null";
    // SAFETY: `path` is a NUL-terminated string that outlives the call.
    let fd = check(unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) })?;
    if fd != 0 {
        // SAFETY: both descriptors are open; dup2 closes fd 0 atomically and replaces it.
        let dup = check(unsafe { libc::dup2(fd, 0) });
        // SAFETY: `fd` is a descriptor we opened above and no longer need.
        unsafe { libc::close(fd) };
        dup?;
    }
    Ok(())
}

/// The effective user id of the process.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid cannot fail and has no preconditions.
    unsafe { libc::geteuid() }
}

/// The extended attribute that holds a file's access ACL (absent when the ACL is just the
/// mode bits).
const ACL_ACCESS: &CStr = c"system.posix_acl_access";

/// Whether `path` (a link followed) has an access ACL beyond its mode bits, which may name
/// other users or groups (`getxattr(2)` of its size only). A file system without ACLs has
/// none.
pub fn has_extended_acl(path: &std::path::Path) -> io::Result<bool> {
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))?;
    // SAFETY: both strings are NUL-terminated and live across the call; a null buffer of
    // size 0 asks only for the value's size, so nothing is written.
    let r = unsafe { libc::getxattr(path.as_ptr(), ACL_ACCESS.as_ptr(), std::ptr::null_mut(), 0) };
    acl_answer(r)
}

/// [`has_extended_acl`] of an open file (`fgetxattr(2)`).
pub fn fd_has_extended_acl(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for the borrow; the name is NUL-terminated and
    // static; a null buffer of size 0 asks only for the value's size, so nothing is written.
    let r =
        unsafe { libc::fgetxattr(fd.as_raw_fd(), ACL_ACCESS.as_ptr(), std::ptr::null_mut(), 0) };
    acl_answer(r)
}

fn acl_answer(size: isize) -> io::Result<bool> {
    if size >= 0 {
        return Ok(size > 0);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENODATA) | Some(libc::EOPNOTSUPP) => Ok(false),
        _ => Err(e),
    }
}

/// The effective group id of the process.
pub fn effective_gid() -> u32 {
    // SAFETY: getegid cannot fail and has no preconditions.
    unsafe { libc::getegid() }
}

unsafe extern "C" {
    /// The C library's environment block.
    static mut environ: *mut *mut libc::c_char;
}

/// Names of environment variables, in the environment's own order.
fn env_entries() -> Vec<*mut libc::c_char> {
    let mut out = Vec::new();
    // SAFETY: called only before any other thread exists (see callers), so nothing modifies
    // `environ` concurrently; the array is NULL-terminated by contract.
    unsafe {
        let mut p = environ;
        if p.is_null() {
            return out;
        }
        while !(*p).is_null() {
            out.push(*p);
            p = p.add(1);
        }
    }
    out
}

/// Overwrites in place, then removes, every environment variable whose value equals
/// `secret`. Returns the names it removed. The bytes are overwritten where they sit (for the
/// initial environment that is the memory `/proc/PID/environ` shows), so the value is gone,
/// not just unlinked.
///
/// Must be called before any other thread is started.
pub fn scrub_env_values_equal_to(secret: &[u8]) -> Vec<String> {
    let mut removed = Vec::new();
    for entry in env_entries() {
        // SAFETY: every entry of `environ` is a NUL-terminated C string that stays valid
        // while no thread modifies the environment (single-threaded, see above).
        let bytes = unsafe { CStr::from_ptr(entry) }.to_bytes();
        let Some(eq) = bytes.iter().position(|&b| b == b'=') else {
            continue;
        };
        if &bytes[eq + 1..] != secret {
            continue;
        }
        let name = String::from_utf8_lossy(&bytes[..eq]).into_owned();
        let value_len = bytes.len() - eq - 1;
        // SAFETY: the value occupies `value_len` bytes right after the '=' of a string we
        // just measured; writing zeros there stays inside it. Volatile writes keep the
        // compiler from dropping a store it may think is dead.
        unsafe {
            let value = entry.add(eq + 1).cast::<u8>();
            for i in 0..value_len {
                std::ptr::write_volatile(value.add(i), 0);
            }
        }
        remove_env_var(OsStr::from_bytes(name.as_bytes()));
        removed.push(name);
    }
    removed
}

/// Names of all environment variables (for the hardening policy to choose from).
pub fn env_names() -> Vec<Vec<u8>> {
    env_entries()
        .into_iter()
        .filter_map(|entry| {
            // SAFETY: as in `scrub_env_values_equal_to`.
            let bytes = unsafe { CStr::from_ptr(entry) }.to_bytes();
            bytes
                .iter()
                .position(|&b| b == b'=')
                .map(|eq| bytes[..eq].to_vec())
        })
        .collect()
}

/// Removes one environment variable. Must be called before any other thread is started.
pub fn remove_env_var(name: &OsStr) {
    // SAFETY: callers run before any other thread exists, so no thread reads the
    // environment concurrently, which is the only precondition of `remove_var`.
    unsafe { std::env::remove_var(name) }
}

/// Writes zeros over `len` bytes at `ptr` in a way the optimiser may not remove, even when
/// the memory is freed right after.
///
/// # Safety
/// `ptr` must be valid for writes of `len` bytes.
unsafe fn wipe(ptr: *mut u8, len: usize) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: the caller guarantees `ptr..ptr+len` is writable; explicit_bzero is memset
    // with a barrier the compiler cannot see through.
    unsafe {
        libc::explicit_bzero(ptr.cast(), len);
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    // SAFETY: as above; the fence and black_box keep the stores alive.
    unsafe {
        std::ptr::write_bytes(ptr, 0, len);
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
        std::hint::black_box(ptr);
    }
}

/// The global allocator of the binary: the system allocator, except that every block is
/// zeroed before it is given back, so freed HTTP and TLS buffers cannot leave a copy of the
/// key (or of anything else) behind in free heap memory. `realloc` allocates, copies and
/// frees, so a block that moves is wiped too.
#[derive(Debug, Default, Clone, Copy)]
pub struct ZeroingAlloc;

// SAFETY: every method delegates the actual allocation to `System`, which upholds the
// `GlobalAlloc` contract; the only addition is wiping a block the caller is giving up, which
// is valid for `layout.size()` bytes by the contract of `dealloc`/`realloc`.
unsafe impl std::alloc::GlobalAlloc for ZeroingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: `ptr` is a live block of `layout.size()` bytes that the caller gives up.
        unsafe {
            wipe(ptr, layout.size());
            std::alloc::System.dealloc(ptr, layout);
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees `new_size` rounded to `layout.align()` does not
        // overflow and is non-zero, so this layout is valid.
        let new_layout =
            unsafe { std::alloc::Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: a fresh allocation; on success both blocks are valid for the copied
        // length, they do not overlap, and the old block is then wiped and freed exactly
        // once, as `realloc` may do.
        unsafe {
            let new = std::alloc::System.alloc(new_layout);
            if !new.is_null() {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            new
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_created_and_removed_only_by_name_inside_the_held_directory() {
        use std::io::Write;
        use std::os::fd::{AsFd, AsRawFd};
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("dir");
        let held = std::fs::File::open(tmp.path()).expect("open dir");
        let mut f = create_in(held.as_fd(), "a.json", 0o600).expect("create");
        // Closed on exec, like every file Rust opens (`flags` in octal; O_CLOEXEC 02000000).
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", f.as_raw_fd()))
            .expect("fdinfo");
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            .expect("flags");
        assert_ne!(flags & libc::O_CLOEXEC as u32, 0, "{info}");
        f.write_all(b"{}").expect("write");
        drop(f);
        let path = tmp.path().join("a.json");
        assert_eq!(std::fs::read(&path).expect("read"), b"{}");
        assert_eq!(
            std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777,
            0o600
        );
        // Never an existing file, nor a link (dangling or not).
        let e = create_in(held.as_fd(), "a.json", 0o600).expect_err("exists");
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        std::os::unix::fs::symlink(tmp.path().join("elsewhere"), tmp.path().join("l"))
            .expect("symlink");
        let e = create_in(held.as_fd(), "l", 0o600).expect_err("a link");
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert!(!tmp.path().join("elsewhere").exists());
        // One component only.
        std::fs::create_dir(tmp.path().join("sub")).expect("mkdir");
        for bad in ["", ".", "..", "sub/x", "../x", "/tmp/x", "a\0b"] {
            let e = create_in(held.as_fd(), bad, 0o600).expect_err(bad);
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
            let e = remove_in(held.as_fd(), bad).expect_err(bad);
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
        assert!(!tmp.path().join("sub/x").exists());
        remove_in(held.as_fd(), "a.json").expect("remove");
        assert!(!path.exists());
        let e = remove_in(held.as_fd(), "a.json").expect_err("gone");
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn a_file_is_published_under_a_new_name_only_if_the_name_is_free() {
        use std::os::fd::AsFd;
        let tmp = tempfile::tempdir().expect("dir");
        let held = std::fs::File::open(tmp.path()).expect("open dir");
        let p = |n: &str| tmp.path().join(n);
        type Publish = fn(std::os::fd::BorrowedFd<'_>, &str, &str) -> io::Result<()>;
        // Each way: the one used, the fallback, and the two behind the choice.
        let ways: [(&str, Publish); 3] = [
            ("publish_in", publish_in),
            ("rename_noreplace_in", rename_noreplace_in),
            ("link_then_unlink_in", link_then_unlink_in),
        ];
        for (way, publish) in ways {
            std::fs::write(p(".a.partial"), way).expect("write");
            publish(held.as_fd(), ".a.partial", "a.json").expect(way);
            assert_eq!(std::fs::read_to_string(p("a.json")).expect("read"), way);
            assert!(!p(".a.partial").exists(), "{way}: the old name is gone");
            // An existing file keeps its name and content; the new one stays where it was.
            std::fs::write(p(".b.partial"), "new").expect("write");
            let e = publish(held.as_fd(), ".b.partial", "a.json").expect_err(way);
            assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{way}");
            assert_eq!(std::fs::read_to_string(p("a.json")).expect("read"), way);
            assert!(p(".b.partial").exists(), "{way}");
            // A link at the new name is not replaced, nor followed.
            std::os::unix::fs::symlink(p("elsewhere"), p("l")).expect("symlink");
            let e = publish(held.as_fd(), ".b.partial", "l").expect_err(way);
            assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{way}");
            assert!(!p("elsewhere").exists(), "{way}");
            for bad in ["", "..", "sub/x", "/tmp/x"] {
                let e = publish(held.as_fd(), ".b.partial", bad).expect_err(bad);
                assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{way} {bad:?}");
            }
            for n in ["a.json", ".b.partial", "l"] {
                std::fs::remove_file(p(n)).expect("clean");
            }
        }
    }

    #[test]
    fn zeroing_allocator_round_trips() {
        use std::alloc::{GlobalAlloc, Layout};
        let a = ZeroingAlloc;
        let layout = Layout::from_size_align(64, 8).expect("layout");
        // SAFETY: test of the allocator contract: a valid layout, the block used within its
        // size, grown with realloc and freed once with the layout it has.
        unsafe {
            let p = a.alloc(layout);
            assert!(!p.is_null());
            std::ptr::write_bytes(p, 0xAB, 64);
            let q = a.realloc(p, layout, 128);
            assert!(!q.is_null());
            assert!((0..64).all(|i| *q.add(i) == 0xAB));
            a.dealloc(q, Layout::from_size_align(128, 8).expect("layout"));
            let z = a.alloc_zeroed(layout);
            assert!((0..64).all(|i| *z.add(i) == 0));
            a.dealloc(z, layout);
        }
    }

    #[test]
    fn mapped_pages_are_page_aligned_zeroed_and_lockable() {
        // The kernel's page size (a power of two, 4 KiB or more), and whole pages of it.
        let page = page_size();
        assert!(page.is_power_of_two() && page >= 4096, "{page}");
        assert_eq!(map_private_pages(page + 1).expect("mmap").len(), 2 * page);
        let region = map_private_pages(10).expect("mmap");
        assert_eq!(region.len(), page);
        assert_eq!(region.as_ptr() as usize % page_size(), 0);
        assert!(region.iter().all(|&b| b == 0));
        region[0] = 1;
        // mlock can be refused by RLIMIT_MEMLOCK on some machines; it must not crash.
        let _ = mlock(region);
        madvise_dontdump(region).expect("madvise");
    }

    #[test]
    fn read_fd_reports_bad_descriptor() {
        let mut buf = [0u8; 4];
        let err = read_fd(-1, &mut buf).expect_err("fd -1 is invalid");
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
    }
}
