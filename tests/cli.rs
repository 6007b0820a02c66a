//! The binary's command line, key input and start-up refusals: exit codes and messages.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;

const UP: &str = "http://127.0.0.1:9/v1/responses";

/// Runs the proxy with `--upstream-url UP FLAG PATH` and the key on stdin, to its exit.
fn exit_with(flag: &str, path: &std::path::Path) -> (Option<i32>, String) {
    run_to_exit(
        &["--upstream-url", UP, flag, path.to_str().expect("utf8")],
        format!("{KEY}\n").as_bytes(),
    )
}

/// The proxy's refusal of `--upstream-ca CA`: it exits 2; its stderr.
fn ca_err(ca: &std::path::Path) -> String {
    let (code, err) = exit_with("--upstream-ca", ca);
    assert_eq!(code, Some(2), "{}: {err}", ca.display());
    err
}

/// Hands `path` (itself, not what a link points to) to the user nobody (needs root).
fn give_to_nobody(path: &std::path::Path) {
    std::os::unix::fs::lchown(path, Some(65534), Some(65534)).expect("lchown");
}

#[test]
fn help_and_version_exit_zero() {
    let (code, out) = run_to_exit(&["--help"], b"");
    assert_eq!(code, Some(0));
    for flag in [
        "--port",
        "--server-info",
        "--http-shutdown",
        "--upstream-url",
        "--dump-dir",
        "--upstream-ca",
        "--max-request-body",
    ] {
        assert!(out.contains(flag), "{flag} missing from --help");
    }
    assert!(
        out.contains("at most 8760h"),
        "the duration bound missing from --help"
    );
    let (code, out) = run_to_exit(&["--version"], b"");
    assert_eq!(code, Some(0));
    assert!(out.contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn bad_flags_exit_2_without_reading_the_key() {
    let cases: &[(&[&str], &str)] = &[
        (&["--bogus"], "--bogus"),
        (&["--port", "notaport"], "--port"),
        (&["--port", "70000"], "--port"),
        (
            &["--upstream-url", "http://api.openai.com/v1/responses"],
            "https",
        ),
        (
            &[
                "--upstream-url",
                "https://user:pw@api.openai.com/v1/responses",
            ],
            "user info",
        ),
        (&["--upstream-url", "ftp://127.0.0.1/x"], "https"),
        (&["--upstream-url", "not a url"], "absolute"),
        (&["--max-request-body", "lots"], "size"),
        (&["--upstream-idle-timeout", "0s"], "greater than zero"),
        (
            &["--header-read-timeout", "18446744073709551615s"],
            "at most 8760h",
        ),
        (&["--log-format", "xml"], "--log-format"),
        (
            &["--max-connections", "18446744073709551615"],
            "--max-connections must be at most 1048576",
        ),
        (
            &["--dump-max-memory", "64000"],
            "--dump-max-memory must be at least 64KiB",
        ),
        (
            &["--worker-threads", "0"],
            "--worker-threads must be between 1 and 64",
        ),
        (
            &["--upstream-ca", "/nonexistent/ca.pem", "--upstream-url", UP],
            "--upstream-ca",
        ),
        (
            &["--upstream-http2", "--upstream-url", UP],
            "--upstream-http2 applies to https upstreams only",
        ),
        (
            &["--upstream-url", "https://a..b/v1/responses"],
            "not a valid TLS server name",
        ),
    ];
    for (args, needle) in cases {
        let (code, err) = run_to_exit(args, format!("{KEY}\n").as_bytes());
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains(KEY), "key echoed: {err}");
    }
}

#[test]
fn a_ca_file_without_certificates_is_a_usage_error() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = write_file(dir.path(), "ca.pem", "hello\n");
    let err = ca_err(&ca);
    assert!(err.contains("no PEM certificate"), "{err}");
}

/// The `--upstream-ca` file decides who may receive the key: one that another user could
/// have written (theirs, writable by others, in a directory of theirs, through a link of
/// theirs) is refused before it is read.
#[test]
fn a_ca_file_another_user_could_change_is_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let open = write_file(dir.path(), "open.pem", "hello\n");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o646)).expect("chmod");
    let err = ca_err(&open);
    assert!(
        err.contains("is writable by other users") && err.contains("who may receive the key"),
        "{err}"
    );
    // Ours, through a link of ours: taken (and then found to hold no certificate).
    let mine = write_file(dir.path(), "mine.pem", "hello\n");
    let our_link = dir.path().join("our-link.pem");
    std::os::unix::fs::symlink(&mine, &our_link).expect("symlink");
    assert!(ca_err(&our_link).contains("no PEM certificate"));
    if !is_root() {
        eprintln!(
            "skipped the rest: handing files to the user nobody needs root (CI runs as root)"
        );
        return;
    }
    let theirs = write_file(dir.path(), "theirs.pem", "hello\n");
    give_to_nobody(&theirs);
    let their_dir = dir.path().join("their-dir");
    std::fs::create_dir(&their_dir).expect("mkdir");
    let in_their_dir = write_file(&their_dir, "ca.pem", "hello\n");
    give_to_nobody(&their_dir);
    let their_link = dir.path().join("their-link.pem");
    std::os::unix::fs::symlink(&mine, &their_link).expect("symlink");
    give_to_nobody(&their_link);
    let our_link_into_theirs = dir.path().join("into-theirs.pem");
    std::os::unix::fs::symlink(&in_their_dir, &our_link_into_theirs).expect("symlink");
    for (ca, named) in [
        (&theirs, &theirs),
        (&in_their_dir, &their_dir),
        (&their_link, &their_link),
        (&our_link_into_theirs, &their_dir),
    ] {
        let err = ca_err(ca);
        assert!(
            err.contains("belongs to another user (uid 65534)")
                && err.contains(named.to_str().expect("utf8")),
            "{}: {err}",
            ca.display()
        );
    }
}

/// A CA handed over through a pipe of the operator's shell (`--upstream-ca <(…)`, which the
/// proxy sees as `/dev/fd/N`, a path that resolves to no file) is read like a file.
#[test]
fn a_ca_from_a_pipe_of_the_operator_is_read() {
    // The proxy's exit code and stderr with `--upstream-ca <(PIPE)`, run by bash.
    let with_pipe = |pipe: &str| {
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!(
                "printf '%s\\n' {KEY} | {} --upstream-url {UP} --upstream-ca <({pipe})",
                bin()
            ))
            .stdin(std::process::Stdio::null())
            .output()
            .expect("bash");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = with_pipe("printf 'hello\\n'");
    assert_eq!(code, Some(2), "{err}");
    // Past the checks and read: its content is what is refused.
    assert!(
        err.contains("/dev/fd/") && err.contains("no PEM certificate"),
        "{err}"
    );
    // A pipe that never ends is read up to a bound, not until memory runs out.
    let (code, err) = with_pipe("yes");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("larger than 16 MiB"), "{err}");
}

/// A named pipe as `--upstream-ca`: read when its writer comes after the proxy opened it,
/// and refused after a bounded wait when no writer comes, instead of holding the start-up
/// for ever (opening a pipe to read waits for a writer unless told not to).
#[test]
fn a_named_pipe_as_the_ca_is_waited_for_a_bounded_time() {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = tempfile::tempdir().expect("dir");
    let fifo = dir.path().join("ca.pipe");
    let made = std::process::Command::new("mkfifo")
        .args(["-m", "600"])
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(made.success());
    // Starts the proxy with the pipe as its CA; returns it and its stderr and stdout.
    let start = || {
        let mut cmd = std::process::Command::new(bin());
        cmd.args(["--upstream-url", UP, "--upstream-ca"])
            .arg(&fifo)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = spawn_with_key(&mut cmd, KEY);
        let err = capture(child.stderr.take().expect("stderr"));
        let out = capture(child.stdout.take().expect("stdout"));
        (child, err, out)
    };
    let exit = |child: &mut Reaped, limit: Duration| {
        poll_until(limit, "exit", || child.try_wait().expect("wait")).code()
    };

    // A writer that comes once the proxy is waiting: what it writes is read.
    let (mut child, err, out) = start();
    // Opening a pipe to write without waiting fails until it has a reader: the proxy.
    let mut w = poll_until(Duration::from_secs(10), "the proxy opens the pipe", || {
        std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .ok()
    });
    w.write_all(b"hello\n").expect("write");
    drop(w);
    assert_eq!(exit(&mut child, Duration::from_secs(10)), Some(2));
    let text = String::from_utf8_lossy(&err.lock().expect("lock")).into_owned();
    assert!(text.contains("no PEM certificate"), "{text}");
    assert!(out.lock().expect("lock").is_empty());

    // No writer at all: refused once the wait is over, saying what to give instead.
    let started = std::time::Instant::now();
    let (mut child, err, _out) = start();
    assert_eq!(exit(&mut child, Duration::from_secs(30)), Some(2));
    assert!(started.elapsed() >= Duration::from_secs(10));
    let text = String::from_utf8_lossy(&err.lock().expect("lock")).into_owned();
    assert!(
        text.contains("did not deliver its certificates and end within 10s")
            && text.contains("give a file of PEM certificates"),
        "{text}"
    );
}

#[test]
fn bad_keys_exit_3_with_a_clear_message_and_no_key_bytes() {
    let long = "k".repeat(8193);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"".to_vec(), "no API key on standard input"),
        (b"\n".to_vec(), "no API key on standard input"),
        (b"\r\n".to_vec(), "no API key on standard input"),
        (long.into_bytes(), "longer than 8192 bytes"),
        (b"sk-test-secretpart with-space\n".to_vec(), "byte 19"),
        (b"\"sk-test-secretpart\"\n".to_vec(), "byte 1"),
        (b"OPENAI_API_KEY=sk-test-secretpart\n".to_vec(), "byte 16"),
        (b"sk-test-secret\xffpart\n".to_vec(), "byte 15"),
    ];
    for (input, needle) in cases {
        let (code, err) = run_to_exit(&["--upstream-url", UP], &input);
        assert_eq!(
            code,
            Some(3),
            "{:?}: {err}",
            String::from_utf8_lossy(&input)
        );
        assert!(err.contains(needle), "{err}");
        assert!(
            err.contains("pipe the key in")
                || err.contains("not allowed")
                || err.contains("one line"),
            "{err}"
        );
        assert!(
            !err.contains("secretpart") && !err.contains("kkkk"),
            "key bytes echoed: {err}"
        );
        assert_eq!(err.trim_end().lines().count(), 1, "one clear line: {err}");
    }
}

#[test]
fn keys_of_every_valid_shape_are_accepted() {
    let jwt = format!("eyJhbGciOiJSUzI1NiJ9.{}.sig-_~+/==", "a".repeat(3000));
    let max = "k".repeat(8192);
    for key in [KEY.to_string(), format!("{KEY}\r"), jwt, max] {
        let p = start_proxy_with(&["--upstream-url", UP], &format!("{key}\n"), &[]);
        assert!(p.port > 0);
    }
    // No trailing newline at all: end of input ends the key.
    let p = start_proxy_with(&["--upstream-url", UP], KEY, &[]);
    assert!(p.port > 0);
}

#[test]
fn token_is_printed_once_without_server_info_and_differs_per_launch() {
    let mut tokens = Vec::new();
    for _ in 0..2 {
        let mut child = spawn_with_key(
            std::process::Command::new(bin())
                .args(["--upstream-url", UP])
                .stderr(std::process::Stdio::piped()),
            KEY,
        );
        let err = capture(child.stderr.take().expect("stderr"));
        let line = poll_until(Duration::from_secs(10), "token line", || {
            let text = String::from_utf8_lossy(&err.lock().expect("lock")).into_owned();
            text.lines()
                .find(|l| l.starts_with("proxy token: "))
                .map(str::to_string)
        });
        let token = line.trim_start_matches("proxy token: ").to_string();
        assert_eq!(token.len(), 43);
        let _ = child.kill();
        let _ = child.wait();
        let text = String::from_utf8_lossy(&err.lock().expect("lock")).into_owned();
        assert_eq!(text.matches(&token).count(), 1, "printed exactly once");
        assert!(!text.contains(KEY));
        tokens.push(token);
    }
    assert_ne!(tokens[0], tokens[1]);
}

#[test]
fn server_info_refusals_exit_6_and_leave_the_path_untouched() {
    let dir = tempfile::tempdir().expect("dir");
    // A symlink to a decoy.
    let decoy = write_file(dir.path(), "decoy", "decoy contents");
    let link = dir.path().join("link.json");
    std::os::unix::fs::symlink(&decoy, &link).expect("symlink");
    let (code, err) = exit_with("--server-info", &link);
    assert_eq!(code, Some(6), "{err}");
    assert!(err.contains("symbolic link"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&decoy).expect("decoy"),
        "decoy contents"
    );
    assert!(
        std::fs::symlink_metadata(&link)
            .expect("link")
            .file_type()
            .is_symlink()
    );

    // An existing file readable by others.
    let loose = write_file(dir.path(), "loose.json", "old");
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let (code, err) = exit_with("--server-info", &loose);
    assert_eq!(code, Some(6), "{err}");
    assert!(err.contains("0644"), "{err}");
    assert_eq!(std::fs::read_to_string(&loose).expect("loose"), "old");

    // A directory writable by everyone without the sticky bit.
    let open = dir.path().join("open");
    std::fs::create_dir(&open).expect("mkdir");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let target = open.join("info.json");
    let (code, err) = exit_with("--server-info", &target);
    assert_eq!(code, Some(6), "{err}");
    assert!(err.contains("sticky"), "{err}");
    assert!(!target.exists());

    // A directory: not a regular file.
    let (code, _) = exit_with("--server-info", dir.path());
    assert_eq!(code, Some(6));

    // A path that cannot be looked at (a name longer than any file system takes) is refused
    // while checking, before the proxy listens, not when the file is written.
    let too_long = dir.path().join(format!("{}.json", "a".repeat(300)));
    let (code, err) = exit_with("--server-info", &too_long);
    assert_eq!(code, Some(6), "{err}");
    assert!(err.contains("inspecting the path"), "{err}");
}

/// A directory or link on the way to the server-info file that another user owns: they
/// could replace the file, and the clients reading it would go to their port.
#[test]
fn a_server_info_path_another_user_could_change_is_refused() {
    if !is_root() {
        eprintln!("skipped: handing directories to the user nobody needs root (CI runs as root)");
        return;
    }
    let dir = tempfile::tempdir().expect("dir");
    let theirs = dir.path().join("theirs");
    std::fs::create_dir(&theirs).expect("mkdir");
    std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mine_under_theirs = theirs.join("mine");
    std::fs::create_dir(&mine_under_theirs).expect("mkdir");
    std::fs::set_permissions(&mine_under_theirs, std::fs::Permissions::from_mode(0o700))
        .expect("chmod");
    give_to_nobody(&theirs);
    // A private directory of ours, reached through a link that is theirs.
    let mine = dir.path().join("mine");
    std::fs::create_dir(&mine).expect("mkdir");
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&mine, &link).expect("symlink");
    give_to_nobody(&link);
    // A link of ours into their directory: the way it really goes is checked too.
    let ours_into_theirs = dir.path().join("ours-into-theirs");
    std::os::unix::fs::symlink(&mine_under_theirs, &ours_into_theirs).expect("symlink");
    // (path, what the refusal names)
    let cases = [
        (theirs.join("info.json"), theirs.clone()),
        (mine_under_theirs.join("info.json"), theirs.clone()),
        (link.join("info.json"), link.clone()),
        (ours_into_theirs.join("info.json"), theirs.clone()),
    ];
    for (path, named) in &cases {
        let (code, err) = exit_with("--server-info", path);
        assert_eq!(code, Some(6), "{}: {err}", path.display());
        assert!(
            err.contains("belongs to another user (uid 65534)")
                && err.contains(named.to_str().expect("utf8")),
            "{}: {err}",
            path.display()
        );
        assert!(!path.exists(), "{}", path.display());
    }
}

/// Starts the proxy with `--server-info INFO`, waits (10 s at most) until the file holds a
/// token, then stops it.
fn writes_server_info(info: &std::path::Path) {
    let mut child = spawn_with_key(
        std::process::Command::new(bin())
            .args([
                "--upstream-url",
                UP,
                "--server-info",
                info.to_str().expect("utf8"),
            ])
            .stderr(std::process::Stdio::null()),
        KEY,
    );
    poll_until(Duration::from_secs(10), "server-info written", || {
        std::fs::read_to_string(info)
            .ok()
            .filter(|t| t.contains("auth_token"))
    });
    let _ = child.kill();
    let _ = child.wait();
}

/// Hands `path` to the group nogroup (needs root); its owner stays.
fn give_to_nogroup(path: &std::path::Path) {
    std::os::unix::fs::lchown(path, None, Some(65534)).expect("lchown");
}

/// A group may write a directory on the way to the server-info file or the `--upstream-ca`
/// file, or that file, only where the group is the proxy user's own private group: any
/// other group may have members who could replace them.
#[test]
fn a_path_its_group_could_change_is_refused_unless_the_group_is_ours() {
    if !is_root() {
        eprintln!("skipped: handing directories to the group nogroup needs root (CI runs as root)");
        return;
    }
    let dir = tempfile::tempdir().expect("dir");
    let mode = |p: &std::path::Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod")
    };
    // A directory its group (nogroup) may write; a sticky one; one only ours may write.
    let shared = dir.path().join("shared");
    let sticky = dir.path().join("sticky");
    let ours = dir.path().join("ours");
    for (d, m) in [(&shared, 0o770), (&sticky, 0o1770), (&ours, 0o770)] {
        std::fs::create_dir(d).expect("mkdir");
        mode(d, m);
    }
    give_to_nogroup(&shared);
    give_to_nogroup(&sticky);
    let info = shared.join("info.json");
    let (code, err) = exit_with("--server-info", &info);
    assert_eq!(code, Some(6), "{err}");
    assert!(
        err.contains("its group (gid 65534) may write it")
            && err.contains(shared.to_str().expect("utf8"))
            && err.contains("chmod g-w"),
        "{err}"
    );
    assert!(!info.exists());
    // The CA: a file its group may write, and a file of ours in the shared directory.
    let group_ca = write_file(dir.path(), "group.pem", "hello\n");
    mode(&group_ca, 0o660);
    give_to_nogroup(&group_ca);
    let in_shared = write_file(&shared, "ca.pem", "hello\n");
    for (ca, named) in [(&group_ca, &group_ca), (&in_shared, &shared)] {
        let err = ca_err(ca);
        assert!(
            err.contains("is writable by its group (gid 65534)")
                && err.contains(named.to_str().expect("utf8")),
            "{}: {err}",
            ca.display()
        );
    }
    // Root's own group (the proxy runs as root here) may write: taken, and so is a sticky
    // directory of a group (it cannot move what is not its members').
    let own_ca = write_file(&ours, "ca.pem", "hello\n");
    mode(&own_ca, 0o660);
    assert!(ca_err(&own_ca).contains("no PEM certificate"));
    let sticky_ca = write_file(&sticky, "ca.pem", "hello\n");
    assert!(ca_err(&sticky_ca).contains("no PEM certificate"));
    for place in [&ours, &sticky] {
        writes_server_info(&place.join("info.json"));
    }
}

/// An access ACL may name other users who may write a directory or file though its group
/// is the proxy user's own: where its mask allows writing, it is refused.
#[test]
fn a_path_an_acl_lets_others_write_is_refused() {
    if !is_root()
        || std::process::Command::new("setfacl")
            .arg("--version")
            .output()
            .is_err()
    {
        eprintln!(
            "skipped: needs root and setfacl (Debian's acl; CI installs it and runs as root)"
        );
        return;
    }
    let setfacl = |entry: &str, p: &std::path::Path| {
        let ok = std::process::Command::new("setfacl")
            .args(["-m", entry])
            .arg(p)
            .status()
            .expect("setfacl")
            .success();
        assert!(ok, "setfacl -m {entry} {}", p.display());
    };
    let dir = tempfile::tempdir().expect("dir");
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).expect("mkdir");
    setfacl("u:nobody:rwx", &shared);
    let info = shared.join("info.json");
    let (code, err) = exit_with("--server-info", &info);
    assert_eq!(code, Some(6), "{err}");
    assert!(
        err.contains("its access ACL may let other users write it")
            && err.contains(shared.to_str().expect("utf8")),
        "{err}"
    );
    assert!(!info.exists());
    let in_shared = write_file(&shared, "ca.pem", "hello\n");
    let shared_ca = write_file(dir.path(), "shared.pem", "hello\n");
    setfacl("u:nobody:rw", &shared_ca);
    for (ca, named) in [(&in_shared, &shared), (&shared_ca, &shared_ca)] {
        let err = ca_err(ca);
        assert!(
            err.contains("has an access ACL that may let other users write it")
                && err.contains(named.to_str().expect("utf8")),
            "{}: {err}",
            ca.display()
        );
    }
    // An ACL that lets no one else write (its mask has no write): taken.
    let read_only = dir.path().join("read-only");
    std::fs::create_dir(&read_only).expect("mkdir");
    setfacl("u:nobody:rx", &read_only);
    let ca = write_file(&read_only, "ca.pem", "hello\n");
    setfacl("u:nobody:r", &ca);
    let err = ca_err(&ca);
    assert!(err.contains("no PEM certificate"), "{err}");
}

#[test]
fn existing_private_server_info_file_is_replaced() {
    let dir = tempfile::tempdir().expect("dir");
    let info = write_file(dir.path(), "info.json", "stale");
    std::fs::set_permissions(&info, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    writes_server_info(&info);
}

#[test]
fn port_in_use_exits_5() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = busy.local_addr().expect("addr").port().to_string();
    let (code, err) = run_to_exit(
        &["--upstream-url", UP, "--port", &port],
        format!("{KEY}\n").as_bytes(),
    );
    assert_eq!(code, Some(5), "{err}");
    assert!(err.contains("cannot listen"), "{err}");
}

#[test]
fn fixed_port_is_used() {
    let port = closed_port();
    let p = start_proxy(&["--upstream-url", UP, "--port", &port.to_string()]);
    assert_eq!(p.port, port);
}

/// `proxy < key-file`: a file others could read is warned about (the key is already where
/// they can get it), naming the file and who; a private file or a pipe is not.
#[test]
fn a_key_file_others_can_read_is_warned_about() {
    // The proxy's stderr with the key read from `file`; a busy port ends it (exit 5) just
    // after the start-up warnings.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = busy.local_addr().expect("addr").port().to_string();
    let stderr_with = |file: &std::path::Path| {
        let out = std::process::Command::new(bin())
            .args(["--upstream-url", UP, "--port", &port])
            .stdin(std::fs::File::open(file).expect("key file"))
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(5));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let warning = "the key was read from a file that others can read";
    let dir = tempfile::tempdir().expect("dir");
    let key = write_file(dir.path(), "key", &format!("{KEY}\n"));
    let mode =
        |m: u32| std::fs::set_permissions(&key, std::fs::Permissions::from_mode(m)).expect("chmod");
    mode(0o644);
    let err = stderr_with(&key);
    assert!(
        err.contains(warning)
            && err.contains("mode=0644")
            && err.contains("every user")
            && err.contains("chmod 600")
            && err.contains(key.to_str().expect("utf8"))
            && !err.contains(KEY),
        "{err}"
    );
    mode(0o600);
    let err = stderr_with(&key);
    assert!(!err.contains(warning), "{err}");
    if !is_root() {
        eprintln!("skipped the rest: handing files to nobody needs root (CI runs as root)");
        return;
    }
    mode(0o640);
    std::os::unix::fs::lchown(&key, None, Some(65534)).expect("chgrp");
    assert!(stderr_with(&key).contains("its group (gid 65534)"));
    mode(0o600);
    give_to_nobody(&key);
    assert!(stderr_with(&key).contains("its owner, another user (uid 65534)"));
}

#[test]
fn key_in_the_environment_is_wiped_and_warned_about() {
    let p = start_proxy_with(
        &["--upstream-url", UP],
        &format!("{KEY}\n"),
        &[("MY_OPENAI_KEY", KEY), ("MY_OPENAI_KEY_NEXT", "kept")],
    );
    let err = poll_until(Duration::from_secs(5), "warning", || {
        let t = p.stderr_text();
        t.contains("MY_OPENAI_KEY").then_some(t)
    });
    assert!(err.contains("env -u MY_OPENAI_KEY"), "{err}");
    assert!(!err.contains(KEY));
    // The initial environment block no longer holds the key (CI runs as root, and the
    // process is non-dumpable, so only root can read this file).
    let environ = std::fs::read(format!("/proc/{}/environ", p.child.id())).expect("read environ");
    let needle = KEY.as_bytes();
    assert!(
        !environ.windows(needle.len()).any(|w| w == needle),
        "key still in /proc/PID/environ"
    );
    // Its bytes are zeroed where they were, and not one byte more: the next variable (the
    // environment is passed sorted, so it is MY_OPENAI_KEY_NEXT) is whole.
    let name = b"MY_OPENAI_KEY=";
    let at = environ
        .windows(name.len())
        .position(|w| w == name)
        .expect("the variable's name is still there")
        + name.len();
    let rest = &environ[at..];
    assert!(rest[..needle.len()].iter().all(|&b| b == 0), "{rest:?}");
    assert!(
        rest[needle.len()..].starts_with(b"\0MY_OPENAI_KEY_NEXT=kept\0"),
        "{:?}",
        String::from_utf8_lossy(&rest[needle.len()..])
    );
    assert!(!err.contains("MY_OPENAI_KEY_NEXT"), "{err}");
    // (Removing LD_* variables changes only the live environment, which /proc does not
    // show; that policy is covered by the unit table in hardening.rs.)
}

#[test]
fn hardening_is_in_place() {
    let p = start_proxy(&["--upstream-url", UP]);
    let pid = p.child.id();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("core line");
    let fields: Vec<&str> = core.split_whitespace().collect();
    assert_eq!(&fields[4..6], ["0", "0"], "{core}");
    // Not dumpable: /proc/PID/mem and friends belong to root.
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(format!("/proc/{pid}/mem")).expect("mem");
    assert_eq!(meta.uid(), 0);
    // stdin was replaced with /dev/null.
    let fd0 = std::fs::read_link(format!("/proc/{pid}/fd/0")).expect("fd0");
    assert_eq!(fd0.to_str(), Some("/dev/null"));
}

/// Starts the proxy with its stderr a pipe whose reader is already gone (a supervisor that
/// stopped reading): every write to it fails with EPIPE.
fn spawn_with_a_dead_stderr(args: &[&str], env: &[(&str, &str)]) -> Reaped {
    use std::io::Write;
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let mut child = std::process::Command::new(bin())
        .args(args)
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(writer)
        .spawn()
        .expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    let _ = stdin.write_all(format!("{KEY}\n").as_bytes());
    Reaped(child)
}

/// A warning at start (here: the key found in the environment) used to be an `eprintln!`,
/// which panics when stderr takes nothing: the proxy died before serving (exit 101).
#[test]
fn a_warning_to_a_stderr_nobody_reads_does_not_stop_the_proxy() {
    let dir = tempfile::tempdir().expect("dir");
    let info = dir.path().join("info.json");
    let mut child = spawn_with_a_dead_stderr(
        &[
            "--upstream-url",
            UP,
            "--server-info",
            info.to_str().expect("utf8"),
        ],
        &[("OPENAI_API_KEY", KEY)],
    );
    poll_until(Duration::from_secs(10), "server-info", || {
        if let Some(st) = child.try_wait().expect("wait") {
            panic!("the proxy exited: {st}");
        }
        std::fs::metadata(&info)
            .ok()
            .filter(|m| m.len() > 0)
            .map(drop)
    });
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(ok.success());
    let st = poll_until(Duration::from_secs(10), "exit", || {
        child.try_wait().expect("wait")
    });
    assert_eq!(st.code(), Some(0), "{st}");
    assert!(!info.exists());
}

/// Without --server-info the token's only way out is stderr: when that takes nothing the
/// proxy could never be used, so it exits 1 (it used to panic, 101).
#[test]
fn without_server_info_a_stderr_that_takes_nothing_is_exit_1() {
    let mut child = spawn_with_a_dead_stderr(&["--upstream-url", UP], &[]);
    let st = poll_until(Duration::from_secs(10), "exit", || {
        child.try_wait().expect("wait")
    });
    assert_eq!(st.code(), Some(1), "{st}");
}

/// Without `--server-info` the token goes to stderr: never into a file others could read
/// (whoever reads it can spend the key through the proxy). A private file receives it.
#[test]
fn the_token_is_not_printed_into_a_file_others_can_read() {
    let dir = tempfile::tempdir().expect("dir");
    let log = dir.path().join("proxy.log");
    let start = |mode: u32| {
        let _ = std::fs::remove_file(&log);
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&log)
            .expect("log file");
        // Set, not asked for at creation: the umask cannot change it.
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .expect("chmod");
        spawn_with_key(
            std::process::Command::new(bin())
                .args(["--upstream-url", UP])
                .stderr(file),
            KEY,
        )
    };
    let mut child = start(0o644);
    let st = poll_until(Duration::from_secs(10), "exit", || {
        child.try_wait().expect("wait")
    });
    let text = std::fs::read_to_string(&log).expect("read log");
    assert_eq!(st.code(), Some(6), "{text}");
    assert!(
        text.contains("refusing to print the proxy token to standard error")
            && text.contains(log.to_str().expect("utf8"))
            && text.contains("mode 0644")
            && text.contains("every user")
            && text.contains("--server-info")
            && !text.contains("proxy token:"),
        "{text}"
    );
    // 0600: the token is printed there, once.
    let mut child = start(0o600);
    let text = poll_until(Duration::from_secs(10), "token line", || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|t| t.contains("proxy token: "))
    });
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(text.matches("proxy token: ").count(), 1, "{text}");
}

/// The start-up warnings are found before logging starts; they are logged once it has, so
/// with `--log-format json` every line on stderr is JSON (they used to be plain text).
#[test]
fn start_up_warnings_follow_the_log_format() {
    let mut p = start_proxy_with(
        &["--upstream-url", UP, "--log-format", "json"],
        &format!("{KEY}\n"),
        &[("MY_OPENAI_KEY", KEY)],
    );
    let log = p.stop_and_read_log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let warning = lines
        .iter()
        .find(|v| v["variable"] == "MY_OPENAI_KEY")
        .unwrap_or_else(|| panic!("no warning: {log}"));
    assert_eq!(warning["level"], "warn");
    assert_eq!(warning["launch_with"], "env -u MY_OPENAI_KEY");
    assert!(!log.contains(KEY));
    // Even at --log-level error, where every other warning is hidden.
    let mut p = start_proxy_with(
        &["--upstream-url", UP, "--log-level", "error"],
        &format!("{KEY}\n"),
        &[("MY_OPENAI_KEY", KEY)],
    );
    let log = p.stop_and_read_log();
    assert!(
        log.contains("warn an environment variable held the API key"),
        "{log}"
    );
    assert!(log.contains("variable=MY_OPENAI_KEY"), "{log}");
    assert!(!log.contains("listening"), "{log}");
}

/// `--dump-dir` is refused (exit 1, one line saying why) when it is a symbolic link (to a
/// directory or not) or a file; nothing is created where a link points.
#[test]
fn dump_dir_refusals_exit_1_and_follow_no_link() {
    let dir = tempfile::tempdir().expect("dir");
    let decoy = dir.path().join("decoy");
    std::fs::create_dir(&decoy).expect("mkdir");
    let link = dir.path().join("dumps");
    std::os::unix::fs::symlink(&decoy, &link).expect("symlink");
    let file = write_file(dir.path(), "file", "x");
    for (path, says) in [(&link, "symbolic link"), (&file, "not a directory")] {
        let (code, err) = exit_with("--dump-dir", path);
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains("--dump-dir") && err.contains(says), "{err}");
    }
    assert_eq!(std::fs::read_dir(&decoy).expect("ls").count(), 0);
    assert_eq!(std::fs::read_to_string(&file).expect("file"), "x");
}

/// A dump directory that another user owns: the proxy serves and says who can delete its
/// dump files.
#[test]
fn a_dump_dir_owned_by_another_user_is_a_warning() {
    if !is_root() {
        eprintln!("skipped: handing a directory to the user nobody needs root (CI runs as root)");
        return;
    }
    let dir = tempfile::tempdir().expect("dir");
    let dumps = dir.path().join("dumps");
    std::fs::create_dir(&dumps).expect("mkdir");
    std::fs::set_permissions(&dumps, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    give_to_nobody(&dumps);
    let mut p = start_proxy(&[
        "--upstream-url",
        UP,
        "--dump-dir",
        dumps.to_str().expect("utf8"),
    ]);
    let log = p.stop_and_read_log();
    let line = log
        .lines()
        .find(|l| l.contains("owned by another user"))
        .unwrap_or_else(|| panic!("no warning: {log}"));
    assert!(line.contains("owner_uid=65534"), "{line}");
    assert!(!log.contains("accessible to other users"), "{log}");
}

/// The key's page cannot be locked (an unprivileged user with no locked-memory allowance):
/// a warning in the log's format, and the proxy serves.
#[test]
fn a_key_that_cannot_be_locked_is_a_warning_in_the_log_format() {
    if !is_root() {
        eprintln!("skipped: switching to the user nobody needs root (CI runs as root)");
        return;
    }
    let mut child = std::process::Command::new("prlimit")
        .args([
            "--memlock=0",
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            bin(),
            "--upstream-url",
            UP,
            "--log-format",
            "json",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(format!("{KEY}\n").as_bytes()).expect("key");
    }
    let stderr = capture(child.stderr.take().expect("stderr"));
    let text = || String::from_utf8_lossy(&stderr.lock().expect("lock")).into_owned();
    let err = poll_until(Duration::from_secs(10), "listening", || {
        let t = text();
        t.contains("\"listening\"").then_some(t)
    });
    let _ = child.kill();
    let _ = child.wait();
    let warning = err
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["level"] == "warn")
        .unwrap_or_else(|| panic!("no warning: {err}"));
    assert!(
        warning["msg"]
            .as_str()
            .is_some_and(|m| m.contains("could not lock the key") && m.contains("ulimit -l")),
        "{warning}"
    );
}

/// The operator typing the key on a terminal: asked for it on stderr, echo off while it is
/// read (the key never comes back to the terminal), echo on again once it is read. A pseudo-
/// terminal made by Python's `pty` stands in for the terminal.
#[test]
fn a_key_typed_on_a_terminal_is_asked_for_and_not_echoed() {
    const SCRIPT: &str = r#"
import os, select, signal, subprocess, sys, termios, time
binary, key, upstream = sys.argv[1], sys.argv[2].encode(), sys.argv[3]
master, slave = os.openpty()
proxy = subprocess.Popen([binary, "--upstream-url", upstream], stdin=slave,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
err = b""
def until(what, check, limit=10.0):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.01)
    proxy.kill()
    sys.exit("timed out waiting for " + what + "; stderr: " + err.decode(errors="replace"))
def stderr_has(text):
    global err
    while select.select([proxy.stderr], [], [], 0)[0]:
        chunk = os.read(proxy.stderr.fileno(), 4096)
        if not chunk:
            break
        err += chunk
    return text in err
echo = lambda: termios.tcgetattr(slave)[3] & termios.ECHO != 0
if not echo():
    sys.exit("a new pseudo-terminal echoes")
try:
    until("the prompt", lambda: stderr_has(b"type or paste the API key"))
    until("echo off", lambda: not echo())
    os.write(master, key + b"\n")
    until("the proxy listening", lambda: stderr_has(b"listening"))
    until("echo back on", echo)
    shown = b""
    while select.select([master], [], [], 0.2)[0]:
        shown += os.read(master, 4096)
    proxy.send_signal(signal.SIGTERM)
    proxy.wait(10)
    stderr_has(b"")
finally:
    # Whatever failed above (a timeout, an exception), no proxy outlives the test.
    if proxy.poll() is None:
        proxy.kill()
if key in shown:
    sys.exit("the key was echoed to the terminal")
if key in err:
    sys.exit("the key is in stderr")
print("ok")
"#;
    let python = std::process::Command::new("python3")
        .args(["-c", SCRIPT, bin(), KEY, UP])
        .output();
    let Ok(out) = python else {
        eprintln!("skipped: needs python3 (CI installs it)");
        return;
    };
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}

/// A `--upstream-ca` that is not a readable file of certificates is refused saying why: a
/// path that does not exist, a directory (at once, not after the wait a pipe gets). A file
/// is read up to 16 MiB and no further.
#[test]
fn a_ca_path_that_is_no_file_or_too_large_is_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let err = ca_err(&dir.path().join("missing.pem"));
    assert!(err.contains("cannot resolve the path"), "{err}");
    let err = ca_err(dir.path());
    assert!(err.contains("Is a directory"), "{err}");
    // Exactly the limit is read (and then found to hold no certificate); a byte more is not.
    let limit = 16 << 20;
    let err = ca_err(&write_file(dir.path(), "full.pem", &"a".repeat(limit)));
    assert!(err.contains("no PEM certificate"), "{err}");
    let err = ca_err(&write_file(dir.path(), "over.pem", &"a".repeat(limit + 1)));
    assert!(err.contains("larger than 16 MiB"), "{err}");
}
