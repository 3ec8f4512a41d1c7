//! [`Proc`]: one child process, from its ready line to its exit.
//!
//! A `Proc` is started with standard output piped (the first line is its ready line, read
//! within a deadline) and standard input piped and held: a component started with
//! `--exit-with-parent` exits when the pipe closes, so a component never outlives the
//! process that started it, even one killed with SIGKILL. Stopping is SIGTERM, a grace,
//! then SIGKILL; dropping a `Proc` that still runs stops it the same way.
use crate::error::Error;
use serde::de::DeserializeOwned;
use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Time between SIGTERM and SIGKILL when nothing else is said.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);

/// A child process, stopped (SIGTERM, then SIGKILL after a grace) when dropped.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    /// Starts `cmd` and waits up to `timeout` for its first line on standard output, parsed
    /// as `R`. On any failure the process is stopped and the error says why; its standard
    /// error (as `cmd` set it, inherited by default) holds its own account.
    pub fn spawn_ready<R: DeserializeOwned>(
        name: impl Into<String>,
        cmd: &mut Command,
        timeout: Duration,
    ) -> Result<(Proc, R), Error> {
        let name = name.into();
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|source| Error::Spawn {
                name: name.clone(),
                source,
            })?;
        let out = child.stdout.take();
        let mut proc = Proc { name, child };
        let line = match out {
            Some(out) => proc.first_line(out, timeout)?,
            None => return Err(proc.exited()),
        };
        match serde_json::from_str(line.trim_end()) {
            Ok(ready) => Ok((proc, ready)),
            Err(source) => Err(Error::BadReadyLine {
                name: proc.name.clone(),
                line,
                source,
            }),
        }
    }

    /// Takes charge of a child started elsewhere (a baseline server, say): it is stopped
    /// when dropped.
    pub fn adopt(name: impl Into<String>, child: Child) -> Proc {
        Proc {
            name: name.into(),
            child,
        }
    }

    /// The name it was started under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status, if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for it to exit, until `deadline` at most.
    pub fn wait_until(&mut self, deadline: Instant) -> Option<ExitStatus> {
        // std has no wait with a timeout; `poll_until` checks `try_wait` with short pauses.
        crate::wait::poll_until(deadline, || self.try_wait())
    }

    /// Sends SIGTERM (nothing when it has exited).
    pub fn terminate(&mut self) {
        if self.try_wait().is_none() {
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
    }

    /// SIGKILL, and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then SIGKILL when it has not exited within `grace`. Its exit status, or
    /// `None` when it had to be killed.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        Proc::stop_all([&mut *self], grace);
        self.try_wait().filter(|s| !killed(s))
    }

    /// Stops several at once: SIGTERM to all, then one grace for all, then SIGKILL to those
    /// still running.
    pub fn stop_all<'a>(procs: impl IntoIterator<Item = &'a mut Proc>, grace: Duration) {
        let mut procs: Vec<&mut Proc> = procs.into_iter().collect();
        for p in procs.iter_mut() {
            p.terminate();
        }
        let deadline = Instant::now() + grace;
        for p in procs {
            if p.wait_until(deadline).is_none() {
                tracing::warn!(process = %p.name, ?grace, "did not stop in time; killing it");
                p.kill();
            }
        }
    }

    /// The first line of `out`, within `timeout`.
    fn first_line(&mut self, out: ChildStdout, timeout: Duration) -> Result<String, Error> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        // A blocking read cannot have a deadline; this thread does the read. It ends with the
        // first line or at end of file, which the child's exit (or our kill) brings.
        let reader = std::thread::Builder::new()
            .name("ready-line".into())
            .spawn(move || {
                let mut line = String::new();
                let read = BufReader::new(out).read_line(&mut line).map(|_| line);
                let _ = tx.send(read);
            })
            .map_err(|source| Error::Spawn {
                name: format!("the reader of {}'s ready line", self.name),
                source,
            })?;
        match rx.recv_timeout(timeout) {
            Ok(Ok(line)) if !line.is_empty() => {
                let _ = reader.join();
                Ok(line)
            }
            Ok(Ok(_)) => Err(self.exited()),
            Ok(Err(source)) => Err(Error::Read {
                name: self.name.clone(),
                source,
            }),
            Err(_) => {
                self.kill();
                Err(Error::NotReady {
                    name: self.name.clone(),
                    timeout,
                })
            }
        }
    }

    /// The error for a child that closed its standard output without a ready line.
    fn exited(&mut self) -> Error {
        // It closed its output, so it is exiting: give it a moment to, for the status.
        let status = self.wait_until(Instant::now() + Duration::from_secs(2));
        Error::Exited {
            name: self.name.clone(),
            status: status.map_or_else(|| "closed its output".to_string(), |s| s.to_string()),
        }
    }
}

/// Whether `s` is a death by SIGKILL.
fn killed(s: &ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    s.signal() == Some(nix::sys::signal::Signal::SIGKILL as i32)
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            self.stop(DEFAULT_GRACE);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    #[derive(Debug, serde::Deserialize)]
    struct Hello {
        hello: u32,
    }

    #[test]
    fn reads_a_typed_ready_line_and_stops_with_sigterm() {
        let (mut p, r) = Proc::spawn_ready::<Hello>(
            "sh",
            &mut sh(r#"trap 'exit 0' TERM; echo '{"hello":7}'; while :; do sleep 1; done"#),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(r.hello, 7);
        assert!(p.try_wait().is_none());
        let s = p.stop(Duration::from_secs(10));
        assert!(s.is_some_and(|s| s.success()), "{s:?}");
    }

    #[test]
    fn a_process_that_ignores_sigterm_is_killed_after_the_grace() {
        let (mut p, _) = Proc::spawn_ready::<Hello>(
            "stubborn",
            &mut sh(r#"trap '' TERM; echo '{"hello":1}'; while :; do sleep 1; done"#),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(p.stop(Duration::from_millis(100)), None);
        assert!(p.try_wait().is_some());
    }

    #[test]
    fn failures_say_which_step_failed() {
        let e = Proc::spawn_ready::<Hello>("quits", &mut sh("exit 3"), Duration::from_secs(10))
            .unwrap_err();
        assert!(matches!(e, Error::Exited { .. }), "{e}");
        assert!(e.to_string().contains("exit status: 3"), "{e}");
        let e = Proc::spawn_ready::<Hello>(
            "chatty",
            &mut sh("echo not json; exec sleep 5"),
            Duration::from_secs(10),
        )
        .unwrap_err();
        assert!(matches!(e, Error::BadReadyLine { .. }), "{e}");
        let e = Proc::spawn_ready::<Hello>("silent", &mut sh("exec sleep 30"), Duration::ZERO)
            .unwrap_err();
        assert!(matches!(e, Error::NotReady { .. }), "{e}");
        let e = Proc::spawn_ready::<Hello>(
            "missing",
            &mut Command::new("/nonexistent/shoal"),
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(matches!(e, Error::Spawn { .. }), "{e}");
    }
}
