//! A function instance that echoes its argument.
//!
//! Run by an agent, it reads everything from the environment the agent sets
//! ([`shoal_sdk::InstanceEnv`]: proxy and dataworker sockets, function, instance id,
//! concurrency). By hand: `echo [PROXY_SOCKET]` (else `$SHOAL_PROXY_SOCKET`). Arguments and
//! results above the proxy's inline limit travel as objects when `$SHOAL_DATAWORKER_SOCKET`
//! is set. Serves until the proxy closes the connection.
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    if let Some(socket) = std::env::args().nth(1) {
        std::env::set_var("SHOAL_PROXY_SOCKET", socket);
    }
    let env = match shoal_sdk::InstanceEnv::from_env("echo") {
        Ok(e) => e,
        Err(e) => {
            eprintln!("usage: echo PROXY_SOCKET (or set SHOAL_PROXY_SOCKET): {e}");
            return ExitCode::from(2);
        }
    };
    let served = match env.register().await {
        Ok(inst) => inst.run(|args| async move { Ok(args) }).await,
        Err(e) => Err(e),
    };
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("echo: {e}");
            ExitCode::FAILURE
        }
    }
}
