//! A function instance that echoes its argument.
//!
//! Usage: `echo [PROXY_SOCKET]`; the socket defaults to `$SHOAL_PROXY_SOCKET`, the instance id
//! to `$SHOAL_INSTANCE_ID` (else `echo-<pid>`), the function name to `$SHOAL_FUNCTION` (else
//! `echo`). Serves until the proxy closes the connection.
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let Some(socket) = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("SHOAL_PROXY_SOCKET").ok())
    else {
        eprintln!("usage: echo PROXY_SOCKET (or set SHOAL_PROXY_SOCKET)");
        return ExitCode::from(2);
    };
    let instance = std::env::var("SHOAL_INSTANCE_ID")
        .unwrap_or_else(|_| format!("echo-{}", std::process::id()));
    let function = std::env::var("SHOAL_FUNCTION").unwrap_or_else(|_| "echo".to_owned());
    match shoal_sdk::serve(
        &socket,
        &function,
        &instance,
        16,
        |args| async move { Ok(args) },
    )
    .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("echo: {e}");
            ExitCode::FAILURE
        }
    }
}
