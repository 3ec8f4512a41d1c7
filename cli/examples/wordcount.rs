//! A function instance that counts the words (runs of non-whitespace bytes) of its argument
//! and answers with the count in decimal.
//!
//! Large inputs are meant to travel as objects: put the input once (`shoal put corpus
//! ./big.txt`), then `shoal fn invoke wordcount --object corpus`. The instance reads the
//! object in place through a zero-copy view (pulled once when it lives on another node); no
//! byte of it crosses the proxy. Environment as for the `echo` example.
use std::process::ExitCode;

/// Words in `bytes`.
fn count_words(bytes: &[u8]) -> u64 {
    let mut words = 0u64;
    let mut in_word = false;
    for &b in bytes {
        let space = b.is_ascii_whitespace();
        if !space && !in_word {
            words += 1;
        }
        in_word = !space;
    }
    words
}

#[tokio::main]
async fn main() -> ExitCode {
    if let Some(socket) = std::env::args().nth(1) {
        std::env::set_var("SHOAL_PROXY_SOCKET", socket);
    }
    let env = match shoal_sdk::InstanceEnv::from_env("wordcount") {
        Ok(e) => e,
        Err(e) => {
            eprintln!("usage: wordcount PROXY_SOCKET (or set SHOAL_PROXY_SOCKET): {e}");
            return ExitCode::from(2);
        }
    };
    let served = match env.register().await {
        Ok(inst) => {
            inst.run_data(|data: shoal_sdk::Data| async move {
                // Counting 100 MiB takes a while: off the async workers.
                let n = tokio::task::spawn_blocking(move || count_words(&data))
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(n.to_string().into_bytes())
            })
            .await
        }
        Err(e) => Err(e),
    };
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wordcount: {e}");
            ExitCode::FAILURE
        }
    }
}
