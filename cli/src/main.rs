//! `shoal`: one binary for every component and for talking to them.
#![forbid(unsafe_code)]

mod args;
mod client_cmds;
mod cluster_cmds;
mod fn_cmds;
mod serve;
mod token_cmds;
mod up;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    quiet_broken_pipe();
    let cli = args::Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // One clear line; the chain of causes joined.
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                let cause = cause.to_string();
                // Errors that wrap another often print it already.
                if !msg.contains(&cause) {
                    msg.push_str(": ");
                    msg.push_str(&cause);
                }
            }
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// `shoal status | head` closes our stdout early; `println!` then panics. Rust ignores
/// SIGPIPE (restoring it needs `unsafe`, kept out of this crate), so exit quietly with the
/// status a SIGPIPE death would give instead of printing a panic.
fn quiet_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .unwrap_or_default();
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(128 + 13);
        }
        default(info);
    }));
}

fn run(cli: args::Cli) -> anyhow::Result<ExitCode> {
    use args::Command::*;
    match cli.command {
        Up(a) => up::up(a),
        Dataworker(a) => serve::dataworker(a),
        Control(a) => cluster_cmds::control(a),
        Proxy(a) => cluster_cmds::proxy(a),
        Agent(a) => cluster_cmds::agent(a),
        Ca { op } => cluster_cmds::ca(op),
        Fn { control, op } => fn_cmds::run(&control, op),
        Token { control, op } => token_cmds::token(&control, op),
        Tenant { control, op } => token_cmds::tenant(&control, op),
        Bench(a) => serve::bench(a),
        BenchPeer {
            tls_dir,
            bytes,
            plain,
        } => {
            shoal_perf::serve_bytes(&tls_dir, bytes, !plain)?;
            Ok(ExitCode::SUCCESS)
        }
        cmd => client_cmds::run(cmd),
    }
}
