//! [`Up`]: `shoal up --json` as a child process, for the perf suite and the integration
//! tests; its ready line is the [`Cluster`] description.
use crate::error::Error;
use crate::process::Proc;
use crate::ready::Cluster;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How to run `shoal up`: a builder over its flags.
///
/// Unlike an interactive `shoal up`, control's HTTP API gets a free port (so several clusters
/// run side by side) unless [`Up::control_http`] names one.
#[derive(Debug, Clone)]
pub struct Up {
    exe: PathBuf,
    runtime_dir: PathBuf,
    nodes: u32,
    control_http: String,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    quiet: bool,
    timeout: Duration,
}

impl Up {
    /// `exe up --json --socket-dir runtime_dir` with one node, logging warnings only.
    pub fn new(exe: impl Into<PathBuf>, runtime_dir: impl Into<PathBuf>) -> Up {
        Up {
            exe: exe.into(),
            runtime_dir: runtime_dir.into(),
            nodes: 1,
            control_http: "127.0.0.1:0".into(),
            args: Vec::new(),
            envs: vec![("SHOAL_LOG".into(), "warn".into())],
            quiet: false,
            timeout: Duration::from_secs(120),
        }
    }

    /// Nodes to start (`--nodes`).
    pub fn nodes(mut self, n: u32) -> Up {
        self.nodes = n;
        self
    }

    /// Control's HTTP API address (`--control-http-addr`; default `127.0.0.1:0`).
    pub fn control_http(mut self, addr: impl Into<String>) -> Up {
        self.control_http = addr.into();
        self
    }

    /// One more flag or value for `shoal up`.
    pub fn arg(mut self, a: impl Into<OsString>) -> Up {
        self.args.push(a.into());
        self
    }

    /// More flags and values for `shoal up`.
    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, args: I) -> Up {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// An environment variable of `shoal up` and the components it starts.
    pub fn env(mut self, k: impl Into<OsString>, v: impl Into<OsString>) -> Up {
        self.envs.push((k.into(), v.into()));
        self
    }

    /// Drop the standard error of `shoal up` and its components (else inherited).
    pub fn quiet(mut self) -> Up {
        self.quiet = true;
        self
    }

    /// How long the whole cluster may take to be ready (default 120 s).
    pub fn timeout(mut self, t: Duration) -> Up {
        self.timeout = t;
        self
    }

    /// The command [`Up::start`] runs.
    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.exe);
        c.args(["up", "--json", "--nodes", &self.nodes.to_string()])
            .args(["--control-http-addr", &self.control_http])
            .arg("--socket-dir")
            .arg(&self.runtime_dir)
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)));
        if self.quiet {
            c.stderr(Stdio::null());
        }
        c
    }

    /// Starts `shoal up` and waits until it describes the running cluster.
    pub fn start(&self) -> Result<RunningUp, Error> {
        let (proc, cluster) = Proc::spawn_ready("shoal up", &mut self.command(), self.timeout)?;
        Ok(RunningUp { proc, cluster })
    }
}

/// A running `shoal up` and what it printed; stopped (SIGTERM, which stops its components)
/// when dropped.
#[derive(Debug)]
pub struct RunningUp {
    proc: Proc,
    cluster: Cluster,
}

impl RunningUp {
    /// The cluster, as `shoal up --json` described it.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// The runtime directory.
    pub fn runtime_dir(&self) -> &Path {
        &self.cluster.runtime_dir
    }

    /// The `shoal up` process itself.
    pub fn process(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// Stops it with SIGTERM (it stops its components in order), then SIGKILL when it has
    /// not exited within `grace`. Its exit status, or `None` when it had to be killed.
    pub fn stop(mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        self.proc.stop(grace)
    }

    /// Waits until `shoal up` has exited, until `deadline` at most.
    pub fn wait_until(&mut self, deadline: Instant) -> Option<std::process::ExitStatus> {
        self.proc.wait_until(deadline)
    }
}
