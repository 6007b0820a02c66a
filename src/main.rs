//! The binary: harden, parse, read the key, prepare (which starts logging; the warnings
//! found before it are logged then), serve (which starts the worker threads), map the
//! result to an exit code. No logic lives here.

use std::os::fd::AsFd;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use responses_api_proxy::config::{Args, Config};
use responses_api_proxy::secret::ApiKey;
use responses_api_proxy::{RunError, hardening, log, paths, sys};

/// Every freed block is zeroed first, so freed HTTP/TLS buffers keep no copy of the key.
#[global_allocator]
static ALLOCATOR: sys::ZeroingAlloc = sys::ZeroingAlloc;

/// How long the exit waits for log lines still queued for stderr.
const LOG_FLUSH_LIMIT: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    let result = run();
    // Lines logged before the end (the last one `stopped`) go out first, unless stderr
    // takes nothing.
    log::flush(LOG_FLUSH_LIMIT);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if !matches!(e, RunError::UsageReported) {
                let _ = log::stderr_line(&["responses-api-proxy: error: ", &e.to_string()]);
            }
            ExitCode::from(e.exit_code())
        }
    }
}

fn run() -> Result<(), RunError> {
    // Before anything else, and before any thread exists.
    hardening::harden_process()?;
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            // clap's own message; --help and --version are not errors.
            let _ = e.print();
            return if e.use_stderr() {
                Err(RunError::UsageReported)
            } else {
                Ok(())
            };
        }
    };
    let config = Config::from_args(args).map_err(|e| RunError::Usage(e.to_string()))?;
    let key = ApiKey::read_from_stdin()?;
    // Warnings found before logging starts (no thread may exist before the environment is
    // scrubbed); logged once it has, in the configured format.
    let mut warnings: Vec<(&str, Vec<(&str, String)>)> = Vec::new();
    if let Some(e) = key.lock_error() {
        warnings.push((
            "could not lock the key in memory; it may be written to swap (raise RLIMIT_MEMLOCK: \
             ulimit -l)",
            vec![("reason", e.to_string())],
        ));
    }
    // Before standard input is replaced: the key's file, if it was one.
    if let Some((file, mode, who)) =
        paths::open_file_readers(std::io::stdin().as_fd(), "/proc/self/fd/0")
    {
        warnings.push((
            "the key was read from a file that others can read; `chmod 600` it (or pipe the \
             key in from a secret store)",
            vec![
                ("file", file),
                ("mode", format!("{mode:04o}")),
                ("readable_by", who.to_string()),
            ],
        ));
    }
    if let Err(e) = sys::replace_stdin_with_dev_null() {
        warnings.push((
            "could not close standard input",
            vec![("reason", e.to_string())],
        ));
    }
    for name in sys::scrub_env_values_equal_to(key.expose_bytes()) {
        let launch = format!("env -u {name}");
        warnings.push((
            "an environment variable held the API key; it was wiped and removed (launch the \
             proxy with `env -u` so the key never sits in its environment)",
            vec![("variable", name), ("launch_with", launch)],
        ));
    }
    let prepared = responses_api_proxy::prepare(config, key)?;
    for (msg, fields) in &warnings {
        let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        prepared.warn(msg, &fields);
    }
    responses_api_proxy::serve(prepared)
}
