//! Helpers shared by the SDK's integration tests: waiting on a condition with a deadline.
#![allow(dead_code)] // each test binary uses a different part

use std::future::Future;
use std::time::Duration;

/// Polls `cond` until it returns `Some`, failing the test (naming `what`) after `within`.
pub(crate) async fn wait_for<T, F, Fut>(what: &str, within: Duration, cond: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    shoal_devcluster::wait::wait_for_async(what, within, cond)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Polls `cond` until it holds, failing the test (naming `what`) after `within`.
pub(crate) async fn wait_until<F, Fut>(what: &str, within: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(what, within, || {
        let c = cond();
        async move { c.await.then_some(()) }
    })
    .await
}

/// The proxy's protocol spoken by hand, on blocking sockets: for tests that play a client
/// the SDK would never be (a forged instance, a caller that opens a lane itself).
pub(crate) mod raw {
    use bytes::BytesMut;
    use shoal_protocol::{
        encode_frame, CallerFrame, FrameDecoder, LaneInfo, ProxyFrame, Role, WireError,
        PROTOCOL_VERSION,
    };
    use std::io::{Read, Write};
    use std::os::fd::{AsFd, OwnedFd};
    use std::os::unix::net::UnixStream;
    use std::path::Path;
    use std::time::Duration;

    /// A connection and what it has read but not decoded yet.
    pub(crate) struct Conn {
        pub(crate) s: UnixStream,
        buf: BytesMut,
    }

    impl Conn {
        pub(crate) fn send(&mut self, f: &CallerFrame) {
            let mut out = Vec::new();
            encode_frame(f, &mut out).unwrap();
            self.s.write_all(&out).unwrap();
        }

        /// The next frame, `None` once the proxy closed the connection.
        pub(crate) fn recv(&mut self) -> Option<ProxyFrame> {
            let dec = FrameDecoder::new(1 << 20);
            loop {
                if let Some(f) = dec.decode::<ProxyFrame>(&mut self.buf).unwrap() {
                    return Some(f);
                }
                let mut chunk = [0u8; 4096];
                match self.s.read(&mut chunk) {
                    Ok(0) => return None,
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                    Err(e) => panic!("reading from the proxy: {e}"),
                }
            }
        }

        /// Which local instances of `function` the proxy says offer lanes.
        pub(crate) fn lanes(&mut self, id: u64, function: &str) -> Vec<LaneInfo> {
            self.send(&CallerFrame::Lanes {
                id,
                function: function.into(),
            });
            match self.recv() {
                Some(ProxyFrame::Lanes { id: got, mut lanes }) => {
                    assert_eq!(got, id);
                    lanes.sort_by(|x, y| x.instance_id.cmp(&y.instance_id));
                    lanes
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// Connects to the proxy at `path` as `role`, presenting `token`: the connection once
    /// welcomed, or the refusal.
    pub(crate) fn open(path: &Path, role: Role, token: Option<&str>) -> Result<Conn, WireError> {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut c = Conn {
            s,
            buf: BytesMut::new(),
        };
        c.send(&CallerFrame::Hello {
            version: PROTOCOL_VERSION,
            role,
            token: token.map(Into::into),
        });
        match c.recv() {
            Some(ProxyFrame::Welcome { .. }) => Ok(c),
            Some(ProxyFrame::Refused(e)) => {
                assert!(c.recv().is_none(), "a refused connection is closed");
                Err(e)
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    /// A lane opened by hand: its socket, its region, and the instance's gauge as a file
    /// (whatever a caller may write into its mapping, it may write through the file).
    pub(crate) struct Lane {
        pub(crate) s: UnixStream,
        pub(crate) region: shoal_shm::LaneRegion,
        pub(crate) gauge: std::fs::File,
    }

    /// Opens a lane on `path` presenting `key`; `None` when the instance hands out none.
    pub(crate) fn open_lane(path: &str, key: &[u8; 16]) -> Option<Lane> {
        let mut s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut msg = b"SHOALLK1".to_vec();
        msg.extend_from_slice(key);
        s.write_all(&msg).ok()?;
        let mut hello = [0u8; 24];
        let (n, mut fds) = shoal_shm::recv_with_fds(s.as_fd(), &mut hello, 2).ok()?;
        if n != 24 || fds.len() != 2 || &hello[..8] != b"SHOALLN1" {
            return None;
        }
        let slots = u32::from_le_bytes(hello[8..12].try_into().unwrap());
        let cap = u64::from_le_bytes(hello[12..20].try_into().unwrap());
        let gauge: OwnedFd = fds.pop()?;
        let region = shoal_shm::LaneRegion::open(fds.pop()?, slots, cap).unwrap();
        Some(Lane {
            s,
            region,
            gauge: std::fs::File::from(gauge),
        })
    }
}
